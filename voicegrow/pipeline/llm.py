"""The language model: a streaming OpenAI-compatible client, an offline stand-in, and chat history.

Answers are spoken, so the first words matter more than the last: the client hands out text deltas
as soon as they arrive, and a caller that is cancelled (barge-in, hang-up) closes the HTTP response at
once. The stream parsing is sans-IO (:class:`SseDecoder`, :class:`ChatStreamDecoder`) so that every
way a server can split, pad or break a stream is tested without a socket.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypedDict

import httpx
import trio

from voicegrow.aiauth import AiService, AiServiceError
from voicegrow.language import detect_language

if TYPE_CHECKING:
    from voicegrow.settings import Settings

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ChatMessage",
    "ChatStreamDecoder",
    "ConversationHistory",
    "LanguageModel",
    "LlmClient",
    "LlmError",
    "OfflineResponder",
    "SseDecoder",
    "SseEvent",
    "ToolCall",
    "ToolCallAssembler",
    "ToolCalls",
    "apology",
    "build_llm",
]

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant on a home smart speaker, talking with children and families. "
    "Answer briefly: one to three short sentences. Your words are spoken aloud, so use plain text only: "
    "no markdown, no emoji, no lists, no links, no code. Answer in the language the user spoke "
    "(if the user speaks Chinese, answer in simplified Chinese). Be warm, simple and safe for children; "
    "if you do not know something, say so in one sentence."
)


class ChatMessage(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


class LlmError(AiServiceError):
    """The language model could not answer. ``reason``: timeout, http_4xx, http_5xx, bad_stream, connect.

    An ``error`` object inside an otherwise well-formed stream is reported as ``bad_stream`` with the
    server's message as ``detail``.
    """


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for; ``arguments`` is the model's JSON text, unparsed."""

    id: str
    name: str
    arguments: str

    def message_part(self) -> dict[str, Any]:
        """The call as it goes back to the model inside the assistant message."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCalls:
    """The last item of a stream whose answer is a request to call functions (``finish_reason``
    ``tool_calls``), after any text the model said first."""

    calls: tuple[ToolCall, ...]


class LanguageModel(Protocol):
    """What the turn pipeline needs from :class:`LlmClient` and :class:`OfflineResponder`.

    With ``tools`` (OpenAI function definitions) the stream may end with one :class:`ToolCalls`;
    without, it yields text only. ``tool_choice="none"`` asks for text even though tools are listed
    (the last round of a tool conversation).
    """

    name: str

    def stream(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
               tool_choice: str | None = None) -> AsyncIterator[str | ToolCalls]: ...

    async def health(self) -> dict[str, object]: ...


# -- history -----------------------------------------------------------------------------------------


class ConversationHistory:
    """The last exchanges of one session, bounded by turns and characters (oldest dropped first).

    Bounds keep the prompt (and so the time to first token) from growing through a long session.
    """

    def __init__(self, max_turns: int, max_chars: int) -> None:
        self.max_turns = max_turns
        self.max_chars = max_chars
        self._turns: deque[tuple[str, str]] = deque()

    def __len__(self) -> int:
        return len(self._turns)

    @property
    def turns(self) -> list[tuple[str, str]]:
        """(user, assistant) pairs, oldest first."""
        return list(self._turns)

    @property
    def chars(self) -> int:
        return sum(len(user) + len(assistant) for user, assistant in self._turns)

    def append(self, user_text: str, assistant_text: str) -> None:
        self._turns.append((user_text, assistant_text))
        self._enforce_bounds()

    def replace_last_assistant(self, text: str) -> None:
        """Keep only what was actually played of the last answer (barge-in).

        If nothing was played the whole exchange is dropped: the user never heard an answer, and
        several APIs reject an empty assistant message.
        """
        if not self._turns:
            return
        user_text, _ = self._turns.pop()
        if text.strip():
            self._turns.append((user_text, text))

    def clear(self) -> None:
        self._turns.clear()

    def to_messages(self) -> list[ChatMessage]:
        """The exchanges as chat messages: the form the session state store keeps between sessions."""
        return [m for user, assistant in self._turns
                for m in ({"role": "user", "content": user}, {"role": "assistant", "content": assistant})]

    def load_messages(self, messages: Sequence[dict[str, object]]) -> None:
        """Append stored chat messages (user/assistant pairs; anything else is skipped)."""
        pending_user: str | None = None
        for message in messages:
            role, content = message.get("role"), message.get("content")
            if not isinstance(content, str):
                continue
            if role == "user":
                pending_user = content
            elif role == "assistant" and pending_user is not None:
                self.append(pending_user, content)
                pending_user = None

    def messages(self, system_prompt: str, user_text: str) -> list[ChatMessage]:
        """The request for a new user utterance: system prompt (if any), history, then the utterance."""
        out: list[ChatMessage] = []
        if system_prompt:
            out.append({"role": "system", "content": system_prompt})
        for user, assistant in self._turns:
            out.append({"role": "user", "content": user})
            out.append({"role": "assistant", "content": assistant})
        out.append({"role": "user", "content": user_text})
        return out

    def _enforce_bounds(self) -> None:
        total = self.chars
        while self._turns and (len(self._turns) > self.max_turns or total > self.max_chars):
            user, assistant = self._turns.popleft()
            total -= len(user) + len(assistant)


# -- server-sent events (sans-IO) ----------------------------------------------------------------------


@dataclass(frozen=True)
class SseEvent:
    data: str
    event: str = "message"


class SseDecoder:
    """Bytes in, :class:`SseEvent` out, following the WHATWG event-stream rules.

    Chunks may split anywhere, even inside a UTF-8 character or between ``\\r`` and ``\\n``.
    Comments (``:`` keepalives) and ``id``/``retry``/unknown fields are ignored.
    """

    def __init__(self) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._data: list[str] = []
        self._event = ""
        self._started = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        text = self._text.decode(chunk)
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        self._pending += text
        return self._drain(final=False)

    def close(self) -> list[SseEvent]:
        """End of the body: a last event without its blank line still counts."""
        self._pending += self._text.decode(b"", final=True)
        events = self._drain(final=True)
        if self._pending:
            events += self._line(self._pending)
            self._pending = ""
        events += self._line("")
        return events

    def _drain(self, final: bool) -> list[SseEvent]:
        events: list[SseEvent] = []
        while True:
            match = re.search(r"\r\n|\r|\n", self._pending)
            if match is None:
                break
            if match.group() == "\r" and match.end() == len(self._pending) and not final:
                break  # maybe the first half of \r\n
            line, self._pending = self._pending[: match.start()], self._pending[match.end():]
            events += self._line(line)
        return events

    def _line(self, line: str) -> list[SseEvent]:
        if not line:
            if not self._data:
                self._event = ""
                return []
            event = SseEvent("\n".join(self._data), self._event or "message")
            self._data, self._event = [], ""
            return [event]
        if line.startswith(":"):
            return []
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        return []


class ChatStreamDecoder:
    """Bytes of a chat-completions answer in, text deltas out; raises :class:`LlmError`.

    Accepts the event stream we ask for and, from servers that ignore ``stream: true``, a plain JSON
    completion (sniffed by its leading ``{``). A stream must end with ``[DONE]`` or a
    ``finish_reason``: a body that just stops is a truncated answer, not a short one.
    """

    def __init__(self) -> None:
        self.done = False
        self.finish_reason: str | None = None
        self.tool_calls = ToolCallAssembler()
        self._sse = SseDecoder()
        self._mode: Literal["unknown", "sse", "json"] = "unknown"
        self._json_body = b""

    def feed(self, chunk: bytes) -> list[str]:
        if self.done:
            return []
        if self._mode == "unknown":
            head = (self._json_body + chunk).lstrip()
            if not head:
                self._json_body += chunk
                return []
            self._mode = "json" if head.startswith(b"{") else "sse"
            chunk, self._json_body = self._json_body + chunk, b""
        if self._mode == "json":
            self._json_body += chunk
            return []
        return self._texts(self._sse.feed(chunk))

    def finish(self) -> list[str]:
        """The body ended: the last deltas, or :class:`LlmError` if the answer was cut off."""
        if self.done:
            return []
        if self._mode == "json":
            self.done = True
            return self._texts_from_object(_load_json(self._json_body.decode("utf-8", "replace")))
        texts = self._texts(self._sse.close())
        if not self.done and self.finish_reason is None:
            raise LlmError("bad_stream", "the stream ended before [DONE]")
        self.done = True
        return texts

    def _texts(self, events: list[SseEvent]) -> list[str]:
        texts: list[str] = []
        for event in events:
            if self.done:
                break
            if event.event == "error":
                raise LlmError("bad_stream", f"error event: {event.data[:300]}")
            for payload in _payloads(event.data):
                if payload == "[DONE]":
                    self.done = True
                    break
                texts += self._texts_from_object(_load_json(payload))
        return texts

    def _texts_from_object(self, obj: object) -> list[str]:
        if not isinstance(obj, dict):
            raise LlmError("bad_stream", f"expected a JSON object, got {type(obj).__name__}")
        if obj.get("error"):
            raise LlmError("bad_stream", f"server error in stream: {_error_message(obj['error'])}")
        choices = obj.get("choices")
        if not choices:
            return []  # e.g. a usage-only chunk
        if not isinstance(choices, list) or not isinstance(choices[0], dict):
            raise LlmError("bad_stream", "choices is not a list of objects")
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        part = choice.get("delta") or choice.get("message") or {}
        if isinstance(part, dict) and part.get("tool_calls"):
            self.tool_calls.feed(part["tool_calls"])
        content = part.get("content") if isinstance(part, dict) else None
        if content is None:
            return []
        if not isinstance(content, str):
            raise LlmError("bad_stream", f"content is {type(content).__name__}, not text")
        return [content] if content else []


class ToolCallAssembler:
    """Streamed ``tool_calls`` deltas in, whole :class:`ToolCall` objects out.

    OpenAI sends each call's ``id`` and ``name`` once and its ``arguments`` in fragments, all keyed
    by ``index``; some servers (Gemini's endpoint, llama.cpp) omit ``index`` or send each call whole.
    A delta without an index continues the last call unless it brings a new id.
    """

    MAX_CALLS = 16
    MAX_ARGUMENT_CHARS = 64 * 1024

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}
        self._last: int | None = None

    def feed(self, deltas: object) -> None:
        if not isinstance(deltas, list):
            raise LlmError("bad_stream", "tool_calls is not a list")
        for delta in deltas:
            if not isinstance(delta, dict):
                raise LlmError("bad_stream", "a tool call delta is not an object")
            function = delta.get("function") or {}
            if not isinstance(function, dict):
                raise LlmError("bad_stream", "a tool call's function is not an object")
            index = delta.get("index")
            call_id = delta.get("id")
            if not isinstance(index, int) or isinstance(index, bool):
                new_id = isinstance(call_id, str) and call_id and all(c["id"] != call_id for c in self._calls.values())
                index = len(self._calls) if new_id or self._last is None else self._last
            call = self._calls.get(index)
            if call is None:
                if len(self._calls) >= self.MAX_CALLS:
                    raise LlmError("bad_stream", f"more than {self.MAX_CALLS} tool calls in one answer")
                call = self._calls[index] = {"id": "", "name": "", "arguments": ""}
            self._last = index
            if isinstance(call_id, str) and call_id:
                call["id"] = call_id
            name, arguments = function.get("name"), function.get("arguments")
            if isinstance(name, str) and name:
                call["name"] = name if not call["name"] or call["name"] == name else call["name"] + name
            if isinstance(arguments, (dict, list)):  # a server that sends parsed JSON
                arguments = json.dumps(arguments, ensure_ascii=False)
            if isinstance(arguments, str):
                call["arguments"] += arguments
                if len(call["arguments"]) > self.MAX_ARGUMENT_CHARS:
                    raise LlmError("bad_stream", "tool call arguments are too long")

    def __bool__(self) -> bool:
        return bool(self._calls)

    def calls(self) -> tuple[ToolCall, ...]:
        """The calls in index order; missing ids are made up (``call_N``), nameless calls dropped."""
        out = []
        for position, index in enumerate(sorted(self._calls)):
            call = self._calls[index]
            if call["name"]:
                out.append(ToolCall(call["id"] or f"call_{position}", call["name"], call["arguments"] or "{}"))
        return tuple(out)


def _payloads(data: str) -> list[str]:
    """One event's data; several JSON lines if a server forgot the blank lines between events."""
    data = data.strip()
    if "\n" in data:
        try:
            json.loads(data)
        except ValueError:
            return [line.strip() for line in data.split("\n") if line.strip()]
    return [data] if data else []


def _load_json(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        raise LlmError("bad_stream", f"not JSON: {text[:120]!r}") from None


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("code") or error)[:300]
    return str(error)[:300]


# -- the remote client ----------------------------------------------------------------------------------


class LlmClient:
    """Streams chat completions from an OpenAI-compatible server (DESIGN §4).

    Deadlines: ``connect_timeout_s`` for the connection; ``timeout_s`` from the call to the first
    token and to the end of the answer; ``idle_timeout_s`` between tokens (keepalive comments do not
    count as tokens). Iterate with ``contextlib.aclosing`` if you may stop early.
    """

    name = "remote"
    PATH = "/v1/chat/completions"

    def __init__(self, base_url: str, api_key: str, secret_key: str, model: str, max_tokens: int,
                 temperature: float, timeout_s: float, *, http_client: httpx.AsyncClient | None = None,
                 connect_timeout_s: float = 5.0, idle_timeout_s: float = 10.0) -> None:
        self.service = AiService(base_url, api_key, secret_key, timeout_s,
                                 connect_timeout_s=connect_timeout_s, http_client=http_client)
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.idle_timeout_s = min(idle_timeout_s, timeout_s)
        self.url = self.service.url(self.PATH)

    async def aclose(self) -> None:
        await self.service.aclose()

    def request_body(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                     tool_choice: str | None = None) -> bytes:
        payload: dict[str, Any] = {"model": self.model, "messages": list(messages), "max_tokens": self.max_tokens,
                                   "temperature": self.temperature, "stream": True}
        if tools:
            payload["tools"] = list(tools)
            if tool_choice:
                payload["tool_choice"] = tool_choice
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")

    async def stream(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                     tool_choice: str | None = None) -> AsyncIterator[str | ToolCalls]:
        """Text deltas of the answer, in order, as they arrive, then the tool calls if the model made
        any (only when ``tools`` were offered); :class:`LlmError` on any failure."""
        decoder = ChatStreamDecoder()
        async with self.service.post_stream(self.PATH, self.request_body(messages, tools, tool_choice),
                                            LlmError) as body:
            token_deadline = float("inf")
            while not decoder.done:
                chunk = await body.read(token_deadline)
                texts = decoder.feed(chunk) if chunk else decoder.finish()
                for text in texts:
                    yield text
                if texts or decoder.tool_calls:
                    # Measured from when the caller asks again, so a slow consumer is not blamed
                    # on the server.
                    token_deadline = trio.current_time() + self.idle_timeout_s
        if tools and decoder.tool_calls:
            calls = decoder.tool_calls.calls()
            if calls:
                yield ToolCalls(calls)

    async def health(self) -> dict[str, object]:
        result = await self.service.health()
        result["model"] = self.model
        return result


# -- the offline stand-in ---------------------------------------------------------------------------


_TIME_QUESTION_EN = re.compile(
    r"\b(what time|what's the time|the time|time is it|what day|which day|what date|what's the date|"
    r"the date|today's date|day of the week|day is it|day is today)\b", re.IGNORECASE)
_TIME_QUESTION_ZH = re.compile(r"几点|什么时间|时间是|日期|星期几|礼拜几|周几|几号|几月|哪天|哪一天")
_WEEKDAYS_ZH = "一二三四五六日"


def apology(lang: str) -> str:
    """What to say when the language model fails, in the user's language."""
    if lang.startswith("zh"):
        return "抱歉，我现在无法回答，请稍后再试。"
    return "Sorry, I can't answer right now. Please try again in a moment."


class OfflineResponder:
    """Answers without any language model, so a fresh install still talks back.

    It tells the time and date when asked, and otherwise repeats what it heard and says that no
    language model is configured — proof that ASR and TTS work, and a hint at what to set up.
    """

    name = "offline"

    def __init__(self, clock: Callable[[], datetime] = datetime.now) -> None:
        self.clock = clock

    async def stream(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                     tool_choice: str | None = None) -> AsyncIterator[str | ToolCalls]:
        """With ``tools`` offered, the built-in ones are called by rule (voicegrow.tools.offline_rules)."""
        user_text = next((str(m.get("content") or "") for m in reversed(messages) if m.get("role") == "user"), "")
        answer: str | None = None
        if tools:
            from voicegrow.tools import offline_rules

            offered = {t.get("function", {}).get("name") for t in tools}
            lang = detect_language(user_text)
            if messages and messages[-1].get("role") == "tool":
                answer = self._tool_answer(messages, lang)
            elif tool_choice != "none":
                found = offline_rules.match(user_text, lang)
                if found is not None and found[0] in offered:
                    await trio.sleep(0)
                    yield ToolCalls((ToolCall("call_offline_0", found[0], json.dumps(found[1])),))
                    return
        for delta in _deltas(self.answer(user_text) if answer is None else answer):
            await trio.sleep(0)
            yield delta

    def _tool_answer(self, messages: Sequence[Mapping[str, Any]], lang: str) -> str:
        """Say what the built-in tools just did (the results after the last assistant message)."""
        from voicegrow.tools import offline_rules

        names: dict[str, str] = {}
        for message in messages:
            for call in message.get("tool_calls") or ():
                names[call["id"]] = call["function"]["name"]
        parts: list[str] = []
        for message in reversed(messages):
            if message.get("role") != "tool":
                break
            name, result = names.get(str(message.get("tool_call_id")), ""), str(message.get("content") or "")
            said = offline_rules.phrase(name, result, lang)
            if said is None and name == "get_time":
                try:
                    said = _time_answer(datetime.fromisoformat(json.loads(result)["iso"]), lang)
                except (ValueError, KeyError, TypeError):
                    said = None
            parts.insert(0, said if said is not None else apology(lang))
        return "".join(parts)

    def answer(self, user_text: str) -> str:
        text = user_text.strip()
        lang = detect_language(text)
        asked_time = (_TIME_QUESTION_ZH if lang == "zh" else _TIME_QUESTION_EN).search(text)
        if asked_time:
            return _time_answer(self.clock(), lang)
        heard = text.rstrip("。！？!?.，, ")
        if lang == "zh":
            if not heard:
                return "我没有听清楚。还没有配置语言模型，我现在只能告诉你时间。"
            return f"我听到你说：{heard}。还没有配置语言模型，我现在只能告诉你时间。"
        if not heard:
            return "I didn't catch that. No language model is configured, so I can only tell you the time."
        return f"I heard: {heard}. No language model is configured, so I can only tell you the time."

    async def health(self) -> dict[str, object]:
        return {"status": "embedded", "detail": "no LLM_BASE_URL: built-in offline responder"}


def _time_answer(now: datetime, lang: str) -> str:
    if lang == "zh":
        period = "上午" if now.hour < 12 else "下午"
        if now.hour < 6:
            period = "凌晨"
        elif now.hour >= 18:
            period = "晚上"
        hour12 = now.hour % 12 or 12
        return (f"现在是{period}{hour12}点{now.minute:02d}分。"  # a short first sentence: spoken sooner
                f"今天是{now.year}年{now.month}月{now.day}日，星期{_WEEKDAYS_ZH[now.weekday()]}。")
    hour12 = now.hour % 12 or 12
    suffix = "AM" if now.hour < 12 else "PM"
    return f"It's {hour12}:{now.minute:02d} {suffix} on {now:%A}, {now:%B} {now.day}, {now.year}."


def _deltas(text: str) -> list[str]:
    """Pieces the size a real model streams: words in English, two or three characters in Chinese."""
    return re.findall(r"[\u3400-\u9fff\uf900-\ufaff]{1,3}\s*|[^\u3400-\u9fff\uf900-\ufaff\s]+\s*", text)


def build_llm(settings: Settings, http_client: httpx.AsyncClient | None = None) -> LlmClient | OfflineResponder:
    """The remote client when ``LLM_BASE_URL`` is set, else the offline responder (in the ``TZ`` time zone)."""
    if not settings.llm_base_url:
        from zoneinfo import ZoneInfo

        log.info("no LLM_BASE_URL: answering with the built-in offline responder")
        zone = ZoneInfo(settings.tz)
        return OfflineResponder(clock=lambda: datetime.now(zone))
    return LlmClient(settings.llm_base_url, settings.llm_api_key, settings.llm_secret_key,
                     settings.llm_model, settings.llm_max_tokens, settings.llm_temperature,
                     settings.llm_timeout, http_client=http_client)
