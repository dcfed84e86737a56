"""Tests for the sentence splitter: boundaries in Chinese and English, markup, and split invariance."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voicegrow.pipeline.sentences import MarkdownStripper, SentenceSplitter


def split(text: str, step: int | None = None, **options: object) -> list[str]:
    splitter = SentenceSplitter(**options)  # type: ignore[arg-type]
    if step is None:
        return splitter.feed(text) + splitter.flush()
    chunks: list[str] = []
    for start in range(0, len(text), step):
        chunks += splitter.feed(text[start: start + step])
    return chunks + splitter.flush()


def speakable(text: str) -> str:
    return "".join(char for char in text if char.isalnum())


@pytest.mark.parametrize(("text", "expected"), [
    ("今天天气很好，阳光明媚。我们去公园吧！你觉得怎么样？",
     ["今天天气很好，", "阳光明媚。我们去公园吧！", "你觉得怎么样？"]),
    ("好的，没问题。", ["好的，没问题。"]),  # "好的，" is too short to be the first chunk
    ("版本3.0已经发布。新功能包括：语音识别、语音合成等。",
     ["版本3.0已经发布。", "新功能包括：语音识别、语音合成等。"]),
    ("他说：“明天见。”然后就走了。", ["他说：“明天见。”", "然后就走了。"]),
    ("你说的是真的吗？！太好了……我们走吧。", ["你说的是真的吗？！", "太好了……我们走吧。"]),
    ("你好!我是小爱.今天怎么样?", ["你好!", "我是小爱.今天怎么样?"]),
])
def test_chinese_boundaries(text: str, expected: list[str]) -> None:
    assert split(text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("Sure, I can help with that. It costs 3.14 dollars. Anything else?",
     ["Sure,", "I can help with that.", "It costs 3.14 dollars.", "Anything else?"]),
    ("Mr. Smith and Dr. Jones met at 5 p.m. on Monday. They talked.",
     ["Mr. Smith and Dr. Jones met at 5 p.m. on Monday.", "They talked."]),
    ("Use a tool, e.g. a hammer, i.e. something heavy. The U.S. Army agrees.",
     ["Use a tool,", "e.g. a hammer, i.e. something heavy.", "The U.S. Army agrees."]),
    ('He said "hi." Then he went home.', ['He said "hi."', "Then he went home."]),
    ("Visit example.com. Or mail a.b@example.com today! See https://x.org/a.b?c=1 now.",
     ["Visit example.com.", "Or mail a.b@example.com today!", "See https://x.org/a.b?c=1 now."]),
    ("Wait... what? That is approx. five dollars (roughly.) J. K. Rowling agrees; fine.",
     ["Wait... what?", "That is approx. five dollars (roughly.)", "J. K. Rowling agrees;", "fine."]),
    ("Here is a list:\n1. Open the app\n2. Tap settings\n3. Done",
     ["Here is a list:", "1. Open the app", "2. Tap settings", "3. Done"]),
    ("I counted to 2. Then I stopped.", ["I counted to 2.", "Then I stopped."]),
])
def test_english_boundaries(text: str, expected: list[str]) -> None:
    assert split(text) == expected


def test_mixed_chinese_and_english() -> None:
    text = "好的，我来播放 Taylor Swift 的歌。This is Love Story. 希望你喜欢！"
    assert split(text) == ["好的，我来播放 Taylor Swift 的歌。", "This is Love Story.", "希望你喜欢！"]


def test_first_chunk_comma_is_optional_and_only_first() -> None:
    text = "今天天气很好，阳光明媚，适合出门。明天会下雨，记得带伞。"
    assert split(text) == ["今天天气很好，", "阳光明媚，适合出门。", "明天会下雨，记得带伞。"]
    assert split(text, first_chunk_comma=False) == ["今天天气很好，阳光明媚，适合出门。", "明天会下雨，记得带伞。"]
    assert split("Well, 1,000 people came.") == ["Well,", "1,000 people came."]


def test_tiny_chunks_are_merged_forward() -> None:
    assert split("Hi. How are you? Ok.", first_sentence_min_chars=6) == ["Hi. How are you?", "Ok."]
    assert split("嗯。好。我知道了。", first_sentence_min_chars=6) == ["嗯。好。我知道了。"]
    assert split("I see. Ok. Fine. That is all.") == ["I see.", "Ok. Fine.", "That is all."]  # after the first
    assert split("嗯。好。我知道了。") == ["嗯。", "好。我知道了。"]


def test_a_short_opener_is_spoken_on_its_own() -> None:
    """ "好的。" merged into the next clause made the first TTS request wait ~12 tokens more."""
    assert split("好的。我来帮你查一下明天的天气。") == ["好的。", "我来帮你查一下明天的天气。"]
    assert split("Sure. Let me look that up for you.") == ["Sure.", "Let me look that up for you."]
    assert split("Hi. How are you? Ok.") == ["Hi.", "How are you?", "Ok."]


def test_the_first_chunk_may_end_at_a_colon() -> None:
    assert split("你说的是：今天天气怎么样。这是测试。") == ["你说的是：", "今天天气怎么样。", "这是测试。"]
    assert split('You said: "Tell me a joke". Goodbye now.') == ["You said:", '"Tell me a joke".', "Goodbye now."]
    assert split("他说：“明天见。”然后就走了。") == ["他说：“明天见。”", "然后就走了。"]  # too short to cut
    assert split("It opens at 7:30 tomorrow morning. Bye.") == ["It opens at 7:30 tomorrow morning.", "Bye."]
    assert split("Milk\nEggs\nBread and butter\n") == ["Milk Eggs", "Bread and butter"]


def test_run_on_sentences_are_cut_at_a_comma_or_space() -> None:
    text = ("This sentence keeps going and going without any full stop, it has a comma though "
            "and it just continues on and on and on and on forever")
    chunks = split(text, max_chars=80)
    assert chunks[0].endswith("full stop,")
    assert all(len(chunk) <= 80 for chunk in chunks)
    words = split("word " * 60, max_chars=50)
    assert all(len(chunk) <= 50 for chunk in words) and len(words) > 5
    assert "".join(words).replace(" ", "") == "word" * 60
    hard = split("没有标点的长句子" * 30, max_chars=40)
    assert [len(chunk) for chunk in hard] == [40] * 6


def test_markdown_is_stripped() -> None:
    text = ("## Title here\n**Bold** text with `code` and *emphasis*.\n- item one\n* item two\n"
            "> quoted line\n---\n```python\nprint(1)\n```\n2 * 3 = 6, and snake_case stays.")
    assert split(text) == ["Title here", "Bold text with code and emphasis.", "item one", "item two",
                           "quoted line", "print(1)", "2 * 3 = 6, and snake_case stays."]


def test_markdown_stripper_alone() -> None:
    stripper = MarkdownStripper()
    out = "".join(stripper.feed(char) for char in "# H\n  - __a__ #1 x_y **b**\n***\nc") + stripper.flush()
    assert out == "H\na #1 x_y b\nc"


def test_flush_resets_for_the_next_reply() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("Hello there, friend") == ["Hello there,"]
    assert splitter.flush() == ["friend"]
    assert splitter.flush() == []
    assert splitter.feed("Sure, why not.") == ["Sure,"]  # the first-chunk rule applies again
    assert splitter.flush() == ["why not."]


def test_chunks_wait_for_the_lookahead_they_need() -> None:
    splitter = SentenceSplitter()
    assert splitter.feed("It costs 3.") == []  # 3. what? A decimal or the end?
    assert splitter.feed("14 euros. And") == ["It costs 3.14 euros."]
    assert splitter.feed(" 你好吗？我很好。") == ["And 你好吗？"]
    assert splitter.flush() == ["我很好。"]


def test_punctuation_only_text_yields_nothing() -> None:
    assert split("...\n---\n。！") == []
    assert split("") == []


def test_bad_options() -> None:
    with pytest.raises(ValueError):
        SentenceSplitter(min_chars=10, max_chars=5)


ENDINGS = ".!?;。！？；…\"'”’」』）)】]》>"
ALPHABET = list("abcXYZ019 .,!?;:\n\"'”)(*#`-_/@") + list("你好世界。，！？、…；：")


def split_into(pieces: list[str], **options: object) -> list[str]:
    splitter = SentenceSplitter(**options)  # type: ignore[arg-type]
    return [chunk for piece in pieces for chunk in splitter.feed(piece)] + splitter.flush()


def stripped(text: str) -> str:
    stripper = MarkdownStripper()
    return stripper.feed(text) + stripper.flush()


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=160), data=st.data())
def test_any_split_into_deltas_gives_the_same_chunks(text: str, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=20)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    for options in ({}, {"max_chars": 40, "min_chars": 3}):
        reference = split_into([text], **options)
        assert split_into(pieces, **options) == reference
        # Nothing speakable is lost or repeated; only markup goes.
        assert speakable("".join(reference)) == speakable(stripped(text))
        assert all(chunk and chunk == chunk.strip() for chunk in reference)
        # Only the terminators and closing quotes that end a chunk may run past max_chars.
        limit = options.get("max_chars", 100)
        assert all(len(chunk.rstrip(ENDINGS)) <= limit for chunk in reference)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=120), data=st.data())
def test_markdown_stripping_is_split_invariant(text: str, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=20)))
    stripper = MarkdownStripper()
    pieces = "".join(stripper.feed(text[a:b]) for a, b in zip([0] + cuts, cuts + [len(text)]))
    assert pieces + stripper.flush() == stripped(text)
