"""Tests for transcript normalization, the character error rate, and language detection."""

from __future__ import annotations

import pytest

from voicegrow.language import detect_language, is_cjk
from voicegrow.textmetrics import char_error_rate, edit_distance, mean_cer, normalize_transcript


@pytest.mark.parametrize(("text", "lang", "expected"), [
    ("What is the weather like today?", "en", "whatistheweatherliketoday"),
    ("Wake me up at seven tomorrow morning.", "en", "wakemeupat7tomorrowmorning"),
    ("Wake me up at 7 tomorrow morning!", "en", "wakemeupat7tomorrowmorning"),
    ("What is one plus one?", "en", "whatis1plus1"),
    ("What is 1 + 1?", "en", "whatis1plus1"),
    ("Someone at twenty past Twelve", "en", "someoneat20past12"),
    ("今天天气怎么样？", "zh", "今天天气怎么样"),
    ("今天天氣怎麼樣？", "zh", "今天天气怎么样"),  # traditional → simplified
    ("明天早上七点叫我起床。", "zh", "明天早上7点叫我起床"),
    ("明天早上 7 點叫我起床", "zh", "明天早上7点叫我起床"),
    ("一加一等于几？", "zh", "1加1等于几"),
    ("1+1=几", "zh", "1加1等于几"),
    ("十二点，二十分，三十五秒，十点", "zh", "12点20分35秒10点"),
    ("电话一二三零", "zh", "电话1230"),
    ("ＡＢＣ１２３", "en", "abc123"),  # full width
])
def test_normalize_transcript(text: str, lang: str, expected: str) -> None:
    assert normalize_transcript(text, lang) == expected


def test_edit_distance() -> None:
    assert edit_distance("", "") == 0
    assert edit_distance("abc", "") == 3
    assert edit_distance("", "ab") == 2
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("sitting", "kitten") == 3
    assert edit_distance("今天天气", "今天的天气") == 1


def test_char_error_rate() -> None:
    assert char_error_rate("明天早上七点叫我起床。", "明天早上7點叫我起床", "zh") == 0.0
    assert char_error_rate("Wake me up at seven.", "wake me up at 7", "en") == 0.0
    # "今天天气怎么样" (7 characters) heard as "今天天气怎样": one deletion.
    assert char_error_rate("今天天气怎么样？", "今天天气怎样", "zh") == pytest.approx(1 / 7)
    # Characters, not words, for English too: "tell me a joke" → "tellmeajoke" (11), one substitution.
    assert char_error_rate("Tell me a joke.", "Tell me a jake.", "en") == pytest.approx(1 / 11)
    assert char_error_rate("abc", "abcdefabc", "en") == pytest.approx(2.0)
    assert char_error_rate("", "", "en") == 0.0
    assert char_error_rate("?!", "something", "en") == 1.0


def test_mean_cer_averages_per_utterance() -> None:
    pairs = [("今天天气怎么样", "今天天气怎样", "zh"), ("tell me a joke", "tell me a joke", "en")]
    assert mean_cer(pairs) == pytest.approx((1 / 7 + 0) / 2)
    assert mean_cer(iter(pairs)) == pytest.approx((1 / 7) / 2)
    with pytest.raises(ValueError):
        mean_cer([])


def test_fixture_transcripts_score_zero_against_themselves(manifest: list[dict]) -> None:
    assert mean_cer((entry["text"], entry["text"], entry["lang"]) for entry in manifest) == 0.0
    for entry in manifest:
        assert normalize_transcript(entry["text"], entry["lang"])


@pytest.mark.parametrize(("text", "expected"), [
    ("今天天气怎么样？", "zh"),
    ("What is the weather like today?", "en"),
    ("播放 Taylor Swift 的歌", "zh"),
    ("Play the song by 周杰伦 please", "zh"),
    ("I read a long English paragraph that happens to quote one name, 李白, in the middle of it.", "en"),
    ("今天天氣怎麼樣", "zh"),
    ("OK", "en"),
    ("", "en"),
    ("123 !?", "en"),
])
def test_detect_language(text: str, expected: str) -> None:
    assert detect_language(text) == expected


def test_detect_language_default_and_is_cjk() -> None:
    assert detect_language("...", default="zh") == "zh"
    assert detect_language("你好", default="en") == "zh"
    assert is_cjk("中") and is_cjk("か") and is_cjk("한")
    assert not is_cjk("a") and not is_cjk("。") and not is_cjk("，") and not is_cjk("1")
