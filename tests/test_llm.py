"""The LLM client (against the in-process fake), SSE parsing, history and the offline responder."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from datetime import datetime

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from bench.fake_ai import FakeAi, FakeAiConfig, canned_reply, run_fake_ai
from voicegrow.pipeline.llm import (
    DEFAULT_SYSTEM_PROMPT,
    ChatStreamDecoder,
    ConversationHistory,
    LlmClient,
    LlmError,
    OfflineResponder,
    SseDecoder,
    SseEvent,
    apology,
    build_llm,
)
from voicegrow.settings import load_settings

USER = [{"role": "user", "content": "Tell me about the moon."}]


def sse(*objects: object) -> bytes:
    return b"".join(b"data: " + json.dumps(o, ensure_ascii=False).encode() + b"\n\n" for o in objects)


def delta(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


STREAM = (b": keepalive\r\n\r\n"
          b"event: message\r\n" + sse({"choices": [{"delta": {"role": "assistant"}}]}).replace(b"\n\n", b"\r\n\r\n")
          + sse(delta("月亮"), delta(" is 🌕"), delta(" far.", None))
          + b"id: 7\nretry: 100\nnonsense line without colon\n" + sse(delta("", "stop"))
          + b"data: [DONE]\n\n"
          + sse(delta("after done is ignored")))
EXPECTED = ["月亮", " is 🌕", " far."]


def decode_in_pieces(body: bytes, cuts: list[int]) -> list[str]:
    decoder = ChatStreamDecoder()
    texts: list[str] = []
    start = 0
    for cut in sorted(cuts) + [len(body)]:
        texts += decoder.feed(body[start:cut])
        start = cut
    texts += decoder.finish()
    return texts


# -- sans-IO parsing --------------------------------------------------------------------------------------


def test_sse_decoder_follows_the_event_stream_rules() -> None:
    decoder = SseDecoder()
    events = decoder.feed(b"\xef\xbb\xbf: hello\n\nevent: error\ndata: a\ndata:b\n\ndata: x\r")
    assert events == [SseEvent("a\nb", "error")]
    assert decoder.feed(b"\n") == []  # \r\n was split: still one line end, no blank line yet
    assert decoder.feed(b"\r\n") == [SseEvent("x")]
    assert decoder.feed(b"data: tail") == []
    assert decoder.close() == [SseEvent("tail")]


def test_chat_stream_split_at_every_byte_offset() -> None:
    for cut in range(len(STREAM) + 1):
        assert decode_in_pieces(STREAM, [cut]) == EXPECTED, f"split at byte {cut}"
    assert decode_in_pieces(STREAM, list(range(len(STREAM)))) == EXPECTED  # one byte at a time


@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_chat_stream_split_anywhere_many_times(cuts: list[int]) -> None:
    assert decode_in_pieces(STREAM, cuts) == EXPECTED


def test_done_ends_the_stream() -> None:
    decoder = ChatStreamDecoder()
    assert decoder.feed(sse(delta("a")) + b"data: [DONE]\n\n") == ["a"]
    assert decoder.done
    assert decoder.feed(b"data: not even json\n\n") == []


@pytest.mark.parametrize("body", [
    sse(delta("a"), {"error": {"message": "quota exceeded", "code": 429}}),
    sse(delta("a")) + b"event: error\ndata: upstream died\n\n",
    sse(delta("a")) + b"data: {\"choices\": [\n\n",
    sse(delta("a")) + b"data: [1, 2]\n\n",
    sse(delta("a"), {"choices": [{"delta": {"content": 5}}]}),
    sse(delta("a"), {"choices": "nope"}),
])
def test_bad_streams_raise_bad_stream(body: bytes) -> None:
    decoder = ChatStreamDecoder()
    with pytest.raises(LlmError) as caught:
        decoder.feed(body)
        decoder.finish()
    assert caught.value.reason == "bad_stream"


def test_error_object_detail_carries_the_server_message() -> None:
    with pytest.raises(LlmError, match="quota exceeded"):
        ChatStreamDecoder().feed(sse({"error": {"message": "quota exceeded"}}))


def test_truncated_stream_is_an_error_but_a_finish_reason_is_enough() -> None:
    cut_off = ChatStreamDecoder()
    assert cut_off.feed(sse(delta("Once upon"))) == ["Once upon"]
    with pytest.raises(LlmError) as caught:
        cut_off.finish()
    assert caught.value.reason == "bad_stream"
    no_done = ChatStreamDecoder()
    assert no_done.feed(sse(delta("Hi."), delta("", "stop"))) == ["Hi."]
    assert no_done.finish() == []


def test_usage_chunks_and_missing_blank_lines_are_tolerated() -> None:
    body = (b'data: {"choices": [], "usage": {"total_tokens": 3}}\n\n'
            b'data: {"choices": [{"delta": {"content": "a"}}]}\n'
            b'data: {"choices": [{"delta": {"content": "b"}}]}\n'
            b"data: [DONE]\n")
    assert decode_in_pieces(body, []) == ["a", "b"]


def test_plain_json_completion_is_accepted() -> None:
    body = b'  \n{"choices": [{"message": {"role": "assistant", "content": "Whole answer."}}]}'
    for cut in range(len(body) + 1):
        assert decode_in_pieces(body, [cut]) == ["Whole answer."]


# -- the client against the fake -----------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeAi]:
    async with run_fake_ai(FakeAiConfig(ttft_ms=0, tokens_per_s=2000, api_key="key", secret_key="sec")) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


def client_for(url: str, http: httpx.AsyncClient, *, secret: str = "sec", timeout_s: float = 5.0,
               **kwargs: float) -> LlmClient:
    return LlmClient(url, "key", secret, "fake-llm", 64, 0.3, timeout_s, http_client=http, **kwargs)


async def collect(client: LlmClient, messages: list = USER) -> list[str]:
    return [text async for text in client.stream(messages)]


async def test_tokens_arrive_in_order_with_a_signed_request(fake: FakeAi, http: httpx.AsyncClient) -> None:
    tokens = await collect(client_for(fake.url, http))
    assert len(tokens) > 10
    assert "".join(tokens) == canned_reply("Tell me about the moon.")
    [request] = fake.requests
    assert request["auth_error"] is None
    assert request["headers"]["authorization"] == "Bearer key"
    assert request["body"] == {"model": "fake-llm", "messages": USER, "max_tokens": 64,
                               "temperature": 0.3, "stream": True}


async def test_base_url_with_v1_suffix_works(fake: FakeAi, http: httpx.AsyncClient) -> None:
    fake.config.reply = "Short."
    assert await collect(client_for(fake.url + "/v1/", http)) == ["Short."]


@pytest.mark.parametrize(("mode", "reason"), [
    ("http_500", "http_5xx"), ("broken_sse", "bad_stream"), ("error_object", "bad_stream")])
async def test_injected_failures(fake: FakeAi, http: httpx.AsyncClient, mode: str, reason: str) -> None:
    fake.config.llm_mode = mode
    with pytest.raises(LlmError) as caught:
        await collect(client_for(fake.url, http))
    assert caught.value.reason == reason


async def test_no_answer_is_a_timeout(fake: FakeAi, http: httpx.AsyncClient) -> None:
    fake.config.llm_mode = "timeout"
    with pytest.raises(LlmError) as caught:
        await collect(client_for(fake.url, http, timeout_s=0.2))
    assert caught.value.reason == "timeout"


async def test_a_gap_between_tokens_is_a_timeout(fake: FakeAi, http: httpx.AsyncClient) -> None:
    fake.config.tokens_per_s = 2
    received: list[str] = []
    with pytest.raises(LlmError) as caught:
        async for text in client_for(fake.url, http, idle_timeout_s=0.05).stream(USER):
            received.append(text)
    assert caught.value.reason == "timeout"
    assert received == ["You "]


async def test_wrong_secret_is_refused(fake: FakeAi, http: httpx.AsyncClient) -> None:
    with pytest.raises(LlmError) as caught:
        await collect(client_for(fake.url, http, secret="wrong"))
    assert (caught.value.reason, caught.value.status) == ("http_4xx", 401)
    assert fake.requests[-1]["auth_error"] == "signature mismatch"


async def test_unreachable_server_is_a_connect_error(http: httpx.AsyncClient) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused
        with pytest.raises(LlmError) as caught:
            await collect(client_for(f"http://127.0.0.1:{port}", http))
        health = await client_for(f"http://127.0.0.1:{port}", http).health()
    assert caught.value.reason == "connect"
    assert health["status"] == "down"


async def test_cancelling_the_consumer_hangs_up(fake: FakeAi, http: httpx.AsyncClient) -> None:
    fake.config.tokens_per_s = 50
    first: list[str] = []
    with trio.CancelScope() as scope:
        async with aclosing(client_for(fake.url, http).stream(USER)) as tokens:
            async for text in tokens:
                first.append(text)
                scope.cancel()
                await trio.sleep(0)
    assert first == ["You "]
    with trio.fail_after(5):
        while fake.open_connections:
            await trio.sleep(0.01)


async def test_health_reports_ok_with_latency(fake: FakeAi, http: httpx.AsyncClient) -> None:
    health = await client_for(fake.url, http).health()
    assert health["status"] == "ok"
    assert isinstance(health["latency_ms"], int) and health["latency_ms"] >= 0
    assert fake.requests[-1]["path"] == "/v1/models" and fake.requests[-1]["auth_error"] is None


async def test_client_without_http_client_owns_and_closes_one(fake: FakeAi) -> None:
    fake.config.reply = "Own client."
    client = LlmClient(fake.url, "key", "sec", "m", 8, 0.0, 5.0)
    try:
        assert await collect(client) == ["Own ", "client."]
    finally:
        await client.aclose()
    assert client.service.http_client.is_closed


# -- history ----------------------------------------------------------------------------------------------


def test_history_is_bounded_by_turns() -> None:
    history = ConversationHistory(max_turns=2, max_chars=10_000)
    for n in range(5):
        history.append(f"q{n}", f"a{n}")
    assert history.turns == [("q3", "a3"), ("q4", "a4")]
    assert history.messages("sys", "q5") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"},
        {"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"},
        {"role": "user", "content": "q5"},
    ]


def test_history_is_bounded_by_characters_oldest_first() -> None:
    history = ConversationHistory(max_turns=100, max_chars=25)
    history.append("0123456789", "0123456789")  # 20
    history.append("abc", "def")  # 26 in all: the first pair goes
    assert history.turns == [("abc", "def")]
    history.append("x" * 30, "y")  # alone over the bound: nothing fits
    assert len(history) == 0 and history.chars == 0


def test_zero_turns_keeps_no_history_and_empty_prompt_is_omitted() -> None:
    history = ConversationHistory(max_turns=0, max_chars=1000)
    history.append("q", "a")
    assert history.messages("", "now") == [{"role": "user", "content": "now"}]


def test_barge_in_keeps_only_what_was_played() -> None:
    history = ConversationHistory(max_turns=5, max_chars=1000)
    history.append("q1", "a1")
    history.append("q2", "A long answer. That was cut.")
    history.replace_last_assistant("A long answer.")
    assert history.turns == [("q1", "a1"), ("q2", "A long answer.")]
    history.replace_last_assistant("  ")
    assert history.turns == [("q1", "a1")]
    ConversationHistory(1, 10).replace_last_assistant("nothing to replace")


def test_default_prompt_asks_for_short_plain_spoken_answers() -> None:
    prompt = DEFAULT_SYSTEM_PROMPT.lower()
    for phrase in ("children", "one to three short sentences", "markdown", "emoji", "language the user spoke"):
        assert phrase in prompt


# -- offline responder, apology, factory ------------------------------------------------------------------


def offline_at(hour: int, minute: int) -> OfflineResponder:
    return OfflineResponder(clock=lambda: datetime(2025, 3, 4, hour, minute))  # a Tuesday


async def answer(responder: OfflineResponder, text: str) -> list[str]:
    return [d async for d in responder.stream([{"role": "system", "content": "x"},
                                               {"role": "user", "content": text}])]


@pytest.mark.parametrize(("question", "expected"), [
    ("What time is it?", "It's 3:05 PM on Tuesday, March 4, 2025."),
    ("what day is it today", "It's 3:05 PM on Tuesday, March 4, 2025."),
    ("现在几点了？", "现在是下午3点05分。今天是2025年3月4日，星期二。"),
    ("今天星期几", "现在是下午3点05分。今天是2025年3月4日，星期二。"),
    ("今天的日期是什么", "现在是下午3点05分。今天是2025年3月4日，星期二。"),
])
async def test_offline_tells_the_time(question: str, expected: str) -> None:
    deltas = await answer(offline_at(15, 5), question)
    assert "".join(deltas) == expected
    assert len(deltas) > 3  # streamed in pieces, like a model


async def test_offline_time_in_the_morning() -> None:
    assert "".join(await answer(offline_at(9, 0), "几点了")).startswith("现在是上午9点00分")
    assert "".join(await answer(offline_at(0, 30), "what time is it")).startswith("It's 12:30 AM")


@pytest.mark.parametrize(("heard", "expected"), [
    ("Tell me a story.", "I heard: Tell me a story. No language model is configured"),
    ("给我讲个故事。", "我听到你说：给我讲个故事。还没有配置语言模型"),
    ("", "I didn't catch that."),
])
async def test_offline_echoes_what_it_heard(heard: str, expected: str) -> None:
    assert "".join(await answer(offline_at(12, 0), heard)).startswith(expected)


async def test_offline_health_says_embedded() -> None:
    assert await OfflineResponder().health() == {
        "status": "embedded", "detail": "no LLM_BASE_URL: built-in offline responder"}


def test_apology_per_language() -> None:
    assert apology("zh") == "抱歉，我现在无法回答，请稍后再试。"
    assert apology("zh-CN") == apology("zh")
    assert apology("en") == "Sorry, I can't answer right now. Please try again in a moment."


async def test_build_llm_picks_by_base_url() -> None:
    assert isinstance(build_llm(load_settings({}, env_file=None)), OfflineResponder)
    settings = load_settings({"LLM_BASE_URL": "http://gw:9", "LLM_API_KEY": "k", "LLM_MODEL": "m",
                              "LLM_TIMEOUT": "7"}, env_file=None)
    async with httpx.AsyncClient() as http:
        client = build_llm(settings, http_client=http)
        assert isinstance(client, LlmClient)
        assert (client.url, client.service.api_key, client.model, client.service.timeout_s) == (
            "http://gw:9/v1/chat/completions", "k", "m", 7.0)
        assert client.service.http_client is http


def test_history_round_trips_through_stored_messages() -> None:
    history = ConversationHistory(max_turns=5, max_chars=1000)
    history.append("几点了？", "现在三点。")
    history.append("thanks", "You're welcome.")
    restored = ConversationHistory(max_turns=5, max_chars=1000)
    restored.load_messages([{"role": "system", "content": "ignored"}, *history.to_messages(),
                            {"role": "user", "content": "an unanswered question is not a turn"}])
    assert restored.turns == history.turns
