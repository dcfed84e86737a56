"""TTS engines: the remote client against the in-process fake, the PCM/WAV decoder, and piper."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from bench.fake_ai import FakeAi, FakeAiConfig, run_fake_ai, tone, wav_header
from voicegrow.settings import load_settings
from voicegrow.pipeline.tts import PcmStreamDecoder, PiperTts, RemoteTts, TtsError, build_tts

PCM = bytes(range(256)) * 3  # 768 bytes: 384 samples


def decode(body: bytes, cuts: list[int]) -> tuple[bytes, int | None, list[bytes]]:
    decoder = PcmStreamDecoder()
    pieces = []
    start = 0
    for cut in sorted(cuts) + [len(body)]:
        pieces.append(decoder.feed(body[start:cut]))
        start = cut
    pieces.append(decoder.close())
    return b"".join(pieces), decoder.sample_rate, pieces


def test_raw_pcm_passes_through_in_whole_samples_at_every_split() -> None:
    for cut in range(len(PCM) + 1):
        audio, rate, pieces = decode(PCM, [cut, cut // 3])
        assert audio == PCM and rate == 24000, f"split at {cut}"
        assert all(len(piece) % 2 == 0 for piece in pieces)


def test_wav_header_is_stripped_and_its_rate_used_at_every_split() -> None:
    body = wav_header(len(PCM), 22050) + PCM
    for cut in range(len(body) + 1):
        audio, rate, pieces = decode(body, [cut])
        assert (audio, rate) == (PCM, 22050), f"split at {cut}"
        assert all(len(piece) % 2 == 0 for piece in pieces)


def test_streaming_wav_with_extra_chunks_and_unknown_sizes() -> None:
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = (b"RIFF" + b"\xff\xff\xff\xff" + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"LIST" + struct.pack("<I", 3) + b"abc\x00" + b"data" + b"\xff\xff\xff\xff" + PCM)
    assert decode(body, [50])[:2] == (PCM, 16000)


def test_odd_trailing_byte_is_dropped_at_the_end() -> None:
    assert decode(PCM + b"\x01", [1, 5])[0] == PCM


@pytest.mark.parametrize("body", [
    b"RIFF\x00\x00\x00\x00AVI LIST",
    wav_header(4, 24000)[:20] + struct.pack("<HHIIHH", 1, 2, 24000, 96000, 4, 16) + b"data\x04\x00\x00\x00",
    wav_header(4, 24000)[:20] + struct.pack("<HHIIHH", 3, 1, 24000, 96000, 4, 32) + b"data\x04\x00\x00\x00",
    b"RIFF\x24\x00\x00\x00WAVEdata\x04\x00\x00\x00abcd",
    b"RIFF\x24\x00\x00\x00WAVEfmt ",
])
def test_unusable_wav_is_bad_audio(body: bytes) -> None:
    with pytest.raises(TtsError) as caught:
        decode(body, [])
    assert caught.value.reason == "bad_audio"


# -- RemoteTts against the fake -----------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeAi]:
    config = FakeAiConfig(tts_first_chunk_ms=0, tts_speedup=1000, api_key="key", secret_key="sec")
    async with run_fake_ai(config) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def remote(url: str, http: httpx.AsyncClient, timeout_s: float = 5.0) -> RemoteTts:
    return RemoteTts(url, "key", "sec", "tts-1", "zh-voice", "en-voice", 0.9, -2.0, timeout_s, http_client=http)


async def speak(engine: RemoteTts, text: str, lang: str) -> list[bytes]:
    return [chunk async for chunk in engine.synthesize(text, lang)]


async def test_pcm_length_follows_the_text_and_the_request_is_signed(fake: FakeAi, http: httpx.AsyncClient) -> None:
    text = "Hello there, little one."
    chunks = await speak(remote(fake.url, http), text, "en")
    assert b"".join(chunks) == tone(round(len(text) * 0.060 * 24000), 24000)
    assert len(chunks) > 1  # streamed, not one blob
    [request] = fake.requests
    assert request["auth_error"] is None
    assert request["body"] == {"model": "tts-1", "input": text, "voice": "en-voice", "speed": 0.9,
                               "response_format": "pcm", "pitch": -2.0}


async def test_voice_follows_the_language(fake: FakeAi, http: httpx.AsyncClient) -> None:
    await speak(remote(fake.url, http), "你好，小朋友。", "zh")
    assert fake.requests[-1]["body"]["voice"] == "zh-voice"


async def test_odd_sized_network_chunks_yield_whole_samples(fake: FakeAi, http: httpx.AsyncClient) -> None:
    fake.config.tts_chunk_bytes = 1001
    chunks = await speak(remote(fake.url, http), "Odd chunks.", "en")
    assert all(len(chunk) % 2 == 0 for chunk in chunks)
    assert b"".join(chunks) == tone(round(11 * 0.060 * 24000), 24000)


async def test_wav_answer_sets_the_output_rate(fake: FakeAi, http: httpx.AsyncClient) -> None:
    fake.config.tts_answer_format, fake.config.tts_wav_rate = "wav", 22050
    fake.config.tts_chunk_bytes = 7  # the header arrives in pieces too
    engine = remote(fake.url, http)
    chunks = await speak(engine, "Wave.", "en")
    assert engine.output_rate == 22050
    assert b"".join(chunks) == tone(round(5 * 0.060 * 22050), 22050)


async def test_empty_text_makes_no_request(fake: FakeAi, http: httpx.AsyncClient) -> None:
    assert await speak(remote(fake.url, http), "  ", "en") == []
    assert fake.requests == []


@pytest.mark.parametrize(("mode", "reason"), [("http_500", "http_5xx"), ("timeout", "timeout")])
async def test_failures_raise_tts_error(fake: FakeAi, http: httpx.AsyncClient, mode: str, reason: str) -> None:
    fake.config.tts_mode = mode
    with pytest.raises(TtsError) as caught:
        await speak(remote(fake.url, http, timeout_s=0.2), "Fail.", "en")
    assert caught.value.reason == reason


async def test_wrong_key_is_http_4xx(fake: FakeAi, http: httpx.AsyncClient) -> None:
    engine = RemoteTts(fake.url, "other", "sec", "m", "z", "e", 1.0, 0.0, 5.0, http_client=http)
    with pytest.raises(TtsError) as caught:
        await speak(engine, "Hi.", "en")
    assert (caught.value.reason, caught.value.status) == ("http_4xx", 401)


async def test_remote_health(fake: FakeAi, http: httpx.AsyncClient) -> None:
    health = await remote(fake.url, http).health()
    assert (health["status"], health["engine"]) == ("ok", "remote")


# -- piper and the factory ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_piper_speaks_english() -> None:
    engine = PiperTts()
    assert engine.output_rate == 22050
    await engine.preload()
    assert engine.loaded
    chunks = [chunk async for chunk in engine.synthesize("Hello! The sun is a star.", "en")]
    samples = np.frombuffer(b"".join(chunks), dtype="<i2").astype(np.float64)
    seconds = len(samples) / engine.output_rate
    assert len(chunks) == 2  # one chunk per sentence, each handed over as soon as it exists
    assert 1.0 < seconds < 5.0
    assert np.sqrt(np.mean(samples ** 2)) > 1000  # clearly not silence
    assert (await engine.health())["loaded"] is True


async def test_piper_does_not_speak_chinese(caplog: pytest.LogCaptureFixture) -> None:
    engine = PiperTts()
    assert [chunk async for chunk in engine.synthesize("你好，今天天气很好。", "zh")] == []
    assert [chunk async for chunk in engine.synthesize("OK，好的。", "en")] == []
    assert [chunk async for chunk in engine.synthesize(" ... ", "en")] == []
    assert "cannot speak Chinese" in caplog.text
    health = await engine.health()
    assert health["status"] == "ok" and "Chinese" in health["detail"]


async def test_build_tts_picks_by_base_url() -> None:
    assert build_tts(load_settings({}, env_file=None)).name == "embedded"
    settings = load_settings({"TTS_BASE_URL": "http://gw:9/v1", "TTS_VOICE_ZH": "zv", "TTS_SPEAKING_RATE": "1.2"},
                             env_file=None)
    async with httpx.AsyncClient() as http:
        engine = build_tts(settings, http_client=http)
        assert isinstance(engine, RemoteTts)
        assert (engine.url, engine.voice_for("zh"), engine.speaking_rate, engine.output_rate) == (
            "http://gw:9/v1/audio/speech", "zv", 1.2, 24000)


# -- the embedded bilingual default -----------------------------------------------------------------------


class FakeVoice:
    """A voice that records what it was asked to say and answers with a fixed tone."""

    def __init__(self, name: str, rate: int) -> None:
        self.name, self.output_rate = name, rate
        self.limiter = None
        self.said: list[str] = []

    async def synthesize(self, text: str, lang: str) -> AsyncIterator[bytes]:
        self.said.append(text)
        yield (np.full(self.output_rate // 10, 1000, dtype="<i2")).tobytes()  # 100 ms

    async def preload(self) -> None:
        raise RuntimeError("no model here")

    def describe(self) -> str:
        return f"fake {self.name}"

    async def health(self) -> dict[str, object]:
        return {"status": "ok", "engine": self.name}


async def test_embedded_routes_each_sentence_by_its_own_language() -> None:
    from voicegrow.pipeline.tts import EmbeddedTts

    zh, en = FakeVoice("zh", 24000), FakeVoice("en", 22050)
    engine = EmbeddedTts(zh, en)  # type: ignore[arg-type]
    assert engine.output_rate == 24000
    out = {}
    for text, lang in [("好的。", "en"), ("This is Love Story.", "zh"), ("播放 Taylor Swift 的歌。", "en"),
                       ("OK.", "zh"), ("123", "zh")]:
        out[text] = b"".join([chunk async for chunk in engine.synthesize(text, lang)])
    assert zh.said == ["好的。", "播放 Taylor Swift 的歌。", "123"]  # no letters: the turn's language
    assert en.said == ["This is Love Story.", "OK."]
    # piper's 22.05 kHz comes out at 24 kHz: 100 ms stays 100 ms
    assert len(out["This is Love Story."]) // 2 == pytest.approx(2400, abs=2)
    assert len(out["好的。"]) // 2 == 2400
    health = await engine.health()
    assert health["status"] == "ok" and health["voices"] == {"zh": "fake zh", "en": "fake en"}
    await engine.preload()  # a voice that fails to load is logged, the server still starts


def test_embedded_asks_for_whole_sentence_cutting_in_chinese() -> None:
    from voicegrow.pipeline.sentences import SentenceSplitter
    from voicegrow.pipeline.tts import EmbeddedTts

    engine = EmbeddedTts(FakeVoice("zh", 24000), FakeVoice("en", 22050))  # type: ignore[arg-type]
    zh = SentenceSplitter(**engine.splitter_options("zh"))  # type: ignore[arg-type]
    text = "好的。今天天气很好，阳光明媚，适合出门。明天会下雨，记得带伞。"
    assert zh.feed(text) + zh.flush() == ["好的。", "今天天气很好，阳光明媚，适合出门。", "明天会下雨，记得带伞。"]
    en = SentenceSplitter(**engine.splitter_options("en"))  # type: ignore[arg-type]
    assert en.feed("Sure. I can help with that.") + en.flush() == ["Sure.", "I can help with that."]


def test_build_tts_embedded_default_is_bilingual() -> None:
    from voicegrow.pipeline.kokoro import KokoroTts
    from voicegrow.pipeline.tts import EmbeddedTts

    engine = build_tts(load_settings({"TTS_OFFLINE_VOICE_ZH": "jm_kumo", "TTS_WORKERS": "2"}, env_file=None))
    assert isinstance(engine, EmbeddedTts)
    assert isinstance(engine.zh, KokoroTts) and isinstance(engine.en, PiperTts)
    assert engine.zh.voice == "jm_kumo" and engine.zh.limiter is engine.en.limiter
    assert engine.zh.limiter.total_tokens == 2


async def test_remote_gets_normalised_text_only_when_asked(http: httpx.AsyncClient) -> None:
    import json

    plain = RemoteTts("http://gw:9/v1", "", "", "tts-1", "zv", "ev", 1.0, 0.0, 5.0, http_client=http)
    normalising = RemoteTts("http://gw:9/v1", "", "", "tts-1", "zv", "ev", 1.0, 0.0, 5.0, http_client=http,
                            normalize_text=True)
    assert json.loads(plain.request_body("现在是7:30。", "zh"))["input"] == "现在是7:30。"
    assert json.loads(normalising.request_body("现在是7:30。", "zh"))["input"] == "现在是七点半。"
    assert json.loads(normalising.request_body("It's 7:30.", "zh"))["input"] == "It's seven thirty."


# -- the offline Mandarin voice ---------------------------------------------------------------------------


def test_mandarin_phonemes_have_tone_sandhi_and_read_english_words() -> None:
    from voicegrow.pipeline.kokoro import MandarinPhonemizer

    phonemize = MandarinPhonemizer()
    assert phonemize("你好。").startswith("ni↗xau↓")  # third tone before third tone: ni2 hao3
    assert phonemize("好的。") == "xau↓ tɤ."
    mixed = phonemize("我喜欢N B A和iPhone。")
    assert "ˈɛn bˈi ˈA" in mixed and "ˈI fˈOn" in mixed  # letters spelled, words from the lexicon
    assert not any(char.isascii() and char.isdigit() for char in phonemize("七点半"))
    assert phonemize("晚安") == "wa↓n a→n" and "ʂɨ↗ɚ↘" in phonemize("星期二，十二")  # a break, but not before 二
    assert "“" in phonemize("周杰伦的《晴天》") and "”" in phonemize("周杰伦的《晴天》")  # a title stands apart


@pytest.mark.parametrize(("text", "expected"), [
    ("西安", "ɕi→ a→n"),  # xi'an, not "xian"
    ("天安门", "tʰjɛ→n a→nmə↗n"),  # inside a three-syllable word too
    ("恩爱", "ə→n ai↘"),
    ("企鹅", "ʨʰi↓ ɤ↗"),
    ("海鸥", "xai↓ ou→"),
    ("安全", "a→nʨʰɥɛ↗n"),  # a word's first syllable needs none
    ("女儿", "ny↓ɚ↗"),  # nor 二's er: 十二 had come back as 十号 with a glottal stop there
])
def test_mandarin_vowel_initial_syllable_inside_a_word_gets_a_syllable_break(text: str, expected: str) -> None:
    from voicegrow.pipeline.kokoro import MandarinPhonemizer

    phonemes = MandarinPhonemizer()(text)
    assert phonemes == expected and "ʔ" not in phonemes, phonemes


@pytest.mark.parametrize(("text", "expected", "not_expected"), [
    ("音量已经调到百分之五十。", "tʰjau↗ tau↘", "tjau↘"),  # 调 + 到 in two words: still tiáo
    ("把温度调低两度", "tʰjau↗ti→", "tjau↘"),
    ("调一下闹钟", "tʰjau↗", "tjau↘"),
    ("音调", "tjau↘", "tʰjau"),  # the noun stays diào
    ("调动工作", "tjau↘tʊ↘ŋ", "tʰjau"),
    ("看得见", "kʰa↘ntɤʨjɛ↘n", "tɤ↗"),  # 得 after a verb is neutral ...
    ("得到", "tɤ↗tau↘", None),  # ... but dé when it leads the word
])
def test_mandarin_polyphones_read_as_a_household_means_them(text: str, expected: str,
                                                            not_expected: str | None) -> None:
    from voicegrow.pipeline.kokoro import MandarinPhonemizer

    phonemes = MandarinPhonemizer()(text)
    assert expected in phonemes, phonemes
    assert not_expected is None or not_expected not in phonemes, phonemes


def test_long_phoneme_strings_are_cut_after_punctuation() -> None:
    from voicegrow.pipeline.kokoro import split_phonemes

    text = ", ".join(["ni↗xau↓ ʨi→ntʰjɛ→n"] * 60)
    pieces = split_phonemes(text, limit=100)
    assert all(len(piece) <= 100 for piece in pieces) and len(pieces) > 5
    assert all(piece.endswith(",") for piece in pieces[:-1])
    assert split_phonemes("x" * 250, limit=100) == ["x" * 100, "x" * 100, "x" * 50]


def test_kokoro_model_is_joined_once_and_checked(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    from voicegrow.pipeline import asr_models
    from voicegrow.pipeline.asr_models import ModelCorrupt, ensure_joined_file

    pieces = []
    for i, data in enumerate((b"abc" * 1000, b"defg" * 999)):
        pieces.append(tmp_path / f"part{i}")
        pieces[-1].write_bytes(data)
    joined = b"abc" * 1000 + b"defg" * 999
    digest = hashlib.sha256(joined).hexdigest()
    dest = tmp_path / "cache" / "model.onnx"
    assert ensure_joined_file(pieces, dest, size=len(joined), sha256=digest, what="m", reinstall="x") == dest
    assert dest.read_bytes() == joined

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("joined again although the stamp matches")

    monkeypatch.setattr(asr_models, "_join_pieces", refuse)
    monkeypatch.setattr(asr_models, "_sha256_file", refuse)
    ensure_joined_file(pieces, dest, size=len(joined), sha256=digest, what="m", reinstall="x")
    monkeypatch.undo()
    with pytest.raises(ModelCorrupt, match="reinstall pkg-1"):
        ensure_joined_file(pieces, tmp_path / "other" / "model.onnx", size=len(joined), sha256="0" * 64,
                           what="m", reinstall="pkg-1")
    assert not (tmp_path / "other" / "model.onnx").exists()


def test_kokoro_rejects_an_unknown_voice() -> None:
    from voicegrow.pipeline.kokoro import KokoroTts

    with pytest.raises(ValueError, match="jf_nezumi"):
        KokoroTts("zf_xiaobei")
    with pytest.raises(Exception, match="TTS_OFFLINE_VOICE_ZH"):
        load_settings({"TTS_OFFLINE_VOICE_ZH": "zf_xiaobei"}, env_file=None)


@pytest.mark.slow
async def test_kokoro_speaks_a_short_chinese_sentence() -> None:
    from voicegrow.pipeline.kokoro import KOKORO_MODEL, KokoroTts, ensure_kokoro_model

    assert ensure_kokoro_model().stat().st_size == KOKORO_MODEL.size
    engine = KokoroTts()
    await engine.preload()
    assert engine.loaded
    samples = np.frombuffer(b"".join([c async for c in engine.synthesize("你好。", "zh")]), dtype="<i2")
    assert 0.3 < len(samples) / 24000 < 3.0
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 500
    assert [c async for c in engine.synthesize("。！", "zh")] == []
    assert (await engine.health())["status"] == "ok"
