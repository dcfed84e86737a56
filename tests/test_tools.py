"""Function calling: the streamed tool-call decoder, the registry's gate, the round loop, the built-ins,
the offline rules, timers and alarms, and MCP servers (a tiny stdio server in tests/)."""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from voicegrow.pipeline.llm import ChatStreamDecoder, LlmClient, LlmError, OfflineResponder, ToolCall, ToolCallAssembler, ToolCalls
from voicegrow.protocol import xiaoai as proto
from voicegrow.protocol.xiaoai import Response
from voicegrow.settings import ConfigError, load_settings
from voicegrow.streaming.xiaoai import XiaoaiLink
from voicegrow.tools import ToolContext, ToolError, ToolRegistry, ToolSpec
from voicegrow.tools.builtins import BuiltinTools
from voicegrow.tools.mcp import McpConfigError, McpServerConfig, McpTools, parse_mcp_servers
from voicegrow.tools.offline_rules import match, parse_number
from voicegrow.tools.runner import converse
from voicegrow.tools.timers import Timer, TimerBook, TimerTools, reminder_text

SHANGHAI = ZoneInfo("Asia/Shanghai")
TINY_SERVER = Path(__file__).with_name("mcp_tiny_server.py")


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _delta(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return _sse({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


# -- the stream decoder -------------------------------------------------------------------------------


def test_openai_tool_call_fragments_are_assembled_after_the_text() -> None:
    decoder = ChatStreamDecoder()
    body = b"".join([
        _delta({"role": "assistant", "content": "One moment. "}),
        _delta({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                "function": {"name": "set_timer", "arguments": ""}}]}),
        _delta({"tool_calls": [{"index": 0, "function": {"arguments": '{"sec'}}]}),
        _delta({"tool_calls": [{"index": 0, "function": {"arguments": 'onds": 3}'}}]}),
        _delta({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "get_time", "arguments": "{}"}}]}),
        _delta({}, "tool_calls"), b"data: [DONE]\n\n"])
    texts = []
    for start in range(0, len(body), 7):  # split anywhere
        texts += decoder.feed(body[start:start + 7])
    texts += decoder.finish()
    assert "".join(texts) == "One moment. "
    assert decoder.finish_reason == "tool_calls"
    assert decoder.tool_calls.calls() == (ToolCall("call_a", "set_timer", '{"seconds": 3}'),
                                          ToolCall("call_b", "get_time", "{}"))


def test_calls_without_index_or_id_and_with_parsed_arguments() -> None:
    calls = ToolCallAssembler()
    calls.feed([{"id": "x1", "function": {"name": "stop", "arguments": {}}}])  # Gemini-style: whole, no index
    calls.feed([{"id": "x2", "function": {"name": "get_time"}}])
    calls.feed([{"function": {"arguments": "{}"}}])  # continues the last one
    calls.feed([{"index": 5, "function": {"name": "list_timers", "arguments": "{}"}}])  # no id at all
    assert calls.calls() == (ToolCall("x1", "stop", "{}"), ToolCall("x2", "get_time", "{}"),
                             ToolCall("call_2", "list_timers", "{}"))


@pytest.mark.parametrize("bad", [{"not": "a list"}, ["text"], [{"function": "name"}]])
def test_malformed_tool_calls_are_a_bad_stream(bad: Any) -> None:
    with pytest.raises(LlmError) as caught:
        ToolCallAssembler().feed(bad)
    assert caught.value.reason == "bad_stream"


def test_a_whole_json_completion_with_tool_calls() -> None:
    decoder = ChatStreamDecoder()
    decoder.feed(json.dumps({"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        "finish_reason": "tool_calls"}]}).encode())
    assert decoder.finish() == []
    assert decoder.tool_calls.calls() == (ToolCall("c", "get_time", "{}"),)


async def test_the_client_streams_text_then_the_calls_from_the_fake() -> None:
    fake = FakeAiConfig(ttft_ms=0, tokens_per_s=1000, tool_preface="Sure. ",
                        tool_calls=[{"name": "set_timer", "arguments": {"seconds": 3, "label": "egg"}}])
    tools = [ToolSpec("set_timer", "timer").openai()]
    async with run_fake_ai(fake) as ai:
        client = LlmClient(ai.url, "", "", "m", 50, 0.0, 5.0)
        items = [item async for item in client.stream([{"role": "user", "content": "hi"}], tools=tools)]
        plain = [item async for item in client.stream([{"role": "user", "content": "hi"}])]
        await client.aclose()
    assert "".join(i for i in items if isinstance(i, str)) == "Sure. "
    assert isinstance(items[-1], ToolCalls)
    (call,) = items[-1].calls
    assert call.name == "set_timer" and json.loads(call.arguments) == {"seconds": 3, "label": "egg"}
    assert ai.requests[0]["body"]["tools"] == tools
    assert all(isinstance(i, str) for i in plain) and "tools" not in ai.requests[1]["body"]


# -- the registry and the round loop -------------------------------------------------------------------


class _Recorder:
    def __init__(self, *, slow_s: float = 0.0) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.slow_s = slow_s

    def list_tools(self) -> list[ToolSpec]:
        return [ToolSpec("echo", "echo", {"type": "object", "required": ["n"], "additionalProperties": False,
                                          "properties": {"n": {"type": "integer", "maximum": 10}}}),
                ToolSpec("refuse", "refuses"), ToolSpec("crash", "crashes"),
                ToolSpec("slow", "slow", timeout_s=0.2), ToolSpec("slow_mutating", "slow", mutating=True, timeout_s=5)]

    async def call(self, name: str, arguments: dict[str, Any], context: ToolContext) -> Any:
        self.calls.append((name, arguments))
        if name == "refuse":
            raise ToolError("no, thank you")
        if name == "crash":
            raise KeyError("secret internals")
        if name in ("slow", "slow_mutating"):
            await trio.sleep(self.slow_s)
        return {"n": arguments.get("n")}


def _context(device: Any = None) -> ToolContext:
    return ToolContext("dev", "en", SHANGHAI, device=device)


@pytest.mark.parametrize("arguments, problem", [
    ('{"n": "3; rm -rf /"}', "is not of type 'integer'"),
    ('{"n": 11}', "greater than the maximum"),
    ('{"n": 3, "cmd": "x"}', "Additional properties"),
    ('{}', "'n' is a required property"),
    ('[1]', "must be a JSON object"),
    ('{"n": 3', "not valid JSON"),
])
async def test_arguments_are_checked_before_the_tool_sees_them(arguments: str, problem: str) -> None:
    tools = _Recorder()
    outcome = await ToolRegistry([tools]).call(ToolCall("c", "echo", arguments), _context())
    assert not outcome.ok and problem in json.loads(outcome.result)["error"]
    assert tools.calls == []


async def test_failures_come_back_as_errors_for_the_model() -> None:
    registry = ToolRegistry([_Recorder(slow_s=1.0)])
    refused = await registry.call(ToolCall("c", "refuse", "{}"), _context())
    crashed = await registry.call(ToolCall("c", "crash", "{}"), _context())
    slow = await registry.call(ToolCall("c", "slow", "{}"), _context())
    unknown = await registry.call(ToolCall("c", "nope", "{}"), _context())
    assert json.loads(refused.result) == {"error": "no, thank you"}
    assert json.loads(crashed.result) == {"error": "the tool failed (KeyError)"}  # no internals leak
    assert "did not answer within 0.2 seconds" in slow.result
    assert "no tool named 'nope'" in unknown.result
    assert not any(o.ok for o in (refused, crashed, slow, unknown))


async def test_a_mutating_call_finishes_when_the_turn_is_cancelled() -> None:
    tools = _Recorder(slow_s=0.3)
    registry = ToolRegistry([tools])
    outcomes = []
    with trio.move_on_after(0.05):
        outcomes.append(await registry.call(ToolCall("c", "slow_mutating", '{"n": 1}'), _context()))
    assert outcomes and outcomes[0].ok  # shielded: it ran to the end
    with trio.move_on_after(0.05):
        outcomes.append(await registry.call(ToolCall("c", "slow", "{}"), _context()))
    assert len(outcomes) == 1  # a read-only call is cancelled with the turn


class _ScriptedModel:
    """A language model that answers from a script: each round, text and/or calls."""

    name = "scripted"

    def __init__(self, rounds: list[tuple[str, list[ToolCall]]]) -> None:
        self.rounds = rounds
        self.requests: list[tuple[list[dict[str, Any]], str | None]] = []

    async def stream(self, messages, tools=None, tool_choice=None):
        self.requests.append(([dict(m) for m in messages], tool_choice))
        text, calls = self.rounds[min(len(self.requests) - 1, len(self.rounds) - 1)]
        if text:
            yield text
        if calls and tools and tool_choice != "none":
            yield ToolCalls(tuple(calls))


async def _converse(model: _ScriptedModel, registry: ToolRegistry, rounds: int = 3) -> tuple[str, list]:
    outcomes: list = []
    context = _context()
    text = "".join([d async for d in converse(model, [{"role": "user", "content": "hi"}], registry, context,
                                              max_rounds=rounds, outcomes=outcomes)])
    return text, outcomes


async def test_results_go_back_as_tool_messages_until_the_model_answers() -> None:
    model = _ScriptedModel([("Let me see. ", [ToolCall("c1", "echo", '{"n": 4}')]), ("It is 4.", [])])
    text, outcomes = await _converse(model, ToolRegistry([_Recorder()]))
    assert text == "Let me see. It is 4."
    second, _ = model.requests[1]
    assert second[-2] == {"role": "assistant", "content": "Let me see. ", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "echo", "arguments": '{"n": 4}'}}]}
    assert second[-1] == {"role": "tool", "tool_call_id": "c1", "content": '{"n": 4}'}
    assert [o.name for o in outcomes] == ["echo"]


async def test_rounds_are_bounded_and_silence_after_failure_is_an_apology() -> None:
    model = _ScriptedModel([("", [ToolCall("c", "refuse", "{}")])])  # calls forever, never says a word
    text, outcomes = await _converse(model, ToolRegistry([_Recorder()]), rounds=2)
    assert len(model.requests) == 3 and model.requests[-1][1] == "none"
    assert len(outcomes) == 2
    assert text.startswith("Sorry")


async def test_stop_ends_the_answer_without_a_word() -> None:
    model = _ScriptedModel([("", [ToolCall("c", "stop", "{}")]), ("never said", [])])
    text, outcomes = await _converse(model, ToolRegistry([BuiltinTools()]))
    assert text == "" and [o.name for o in outcomes] == ["stop"] and len(model.requests) == 1


# -- volume -------------------------------------------------------------------------------------------


class _SpeakerShell:
    """Stands in for the speaker behind an XiaoaiLink: records every request, answers exit 0."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def call(self, request: Any) -> Response:
        self.requests.append(request)
        return Response(request.id, data={"stdout": "", "stderr": "", "exit_code": 0})


async def test_volume_reaches_an_open_xiaoai_speaker_as_the_fixed_command() -> None:
    shell = _SpeakerShell()
    async with trio.open_nursery() as nursery:
        link = XiaoaiLink(None, shell.call, nursery, model="LX06")  # type: ignore[arg-type]
        registry = ToolRegistry([BuiltinTools()])
        ok = await registry.call(ToolCall("c", "set_volume", '{"action": "set", "level": 30}'), _context(link))
        down = await registry.call(ToolCall("c", "set_volume", '{"action": "down"}'), _context(link))
        bad = [await registry.call(ToolCall("c", "set_volume", json.dumps({"action": "set", "level": level})),
                                   _context(link))
               for level in ("30; reboot", "$(reboot)", 101, -5, 30.5, True, None)]
    assert ok.ok and json.loads(ok.result) == {"volume": 30, "previous": 50}
    assert down.ok and json.loads(down.result)["volume"] == 15
    assert [r.payload for r in shell.requests] == [proto.volume_command("LX06", 30), proto.volume_command("LX06", 15)]
    assert proto.volume_command("LX06", 30) == "ubus call mediaplayer player_set_volume '{\"volume\":30}'"
    assert all(not o.ok and "invalid arguments" in o.result for o in bad), [o.result for o in bad]
    assert len(shell.requests) == 2  # nothing refused reached the speaker


@pytest.mark.parametrize("level", ["30; reboot", 101, -1, True, 3.0, "30"])
def test_the_volume_command_takes_only_an_integer_in_range(level: Any) -> None:
    with pytest.raises(proto.XiaoaiError):
        proto.volume_command("LX06", level)


async def test_a_device_without_volume_control_says_so() -> None:
    outcome = await ToolRegistry([BuiltinTools()]).call(ToolCall("c", "set_volume", '{"action": "up"}'), _context())
    assert json.loads(outcome.result) == {"error": "this device cannot change its volume"}


# -- offline rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, lang, expected", [
    ("几点了", "zh", ("get_time", {})),
    ("现在几点了？", "zh", ("get_time", {})),
    ("定一个五分钟的计时器", "zh", ("set_timer", {"seconds": 300})),
    ("定一个十秒的计时器", "zh", ("set_timer", {"seconds": 10})),
    ("音量调小一点", "zh", ("set_volume", {"action": "down"})),
    ("声音大一点", "zh", ("set_volume", {"action": "up"})),
    ("音量调到三十", "zh", ("set_volume", {"action": "set", "level": 30})),
    ("明天早上七点叫我起床。", "zh", ("set_alarm", {"time": "07:00"})),
    ("下午三点半提醒我开会", "zh", ("set_alarm", {"time": "15:30"})),
    ("取消闹钟", "zh", ("cancel_timer", {"kind": "alarm"})),
    ("我有哪些闹钟", "zh", ("list_timers", {})),
    ("停", "zh", ("stop", {})),
    ("what time is it", "en", ("get_time", {})),
    ("set a timer for ten seconds", "en", ("set_timer", {"seconds": 10})),
    ("Set a timer for 3 seconds.", "en", ("set_timer", {"seconds": 3})),
    ("start a five minute timer", "en", ("set_timer", {"seconds": 300})),
    ("Please turn the volume down a little.", "en", ("set_volume", {"action": "down"})),
    ("set the volume to 40", "en", ("set_volume", {"action": "set", "level": 40})),
    ("Wake me up at seven tomorrow morning.", "en", ("set_alarm", {"time": "07:00"})),
    ("wake me at 6:30 pm", "en", ("set_alarm", {"time": "18:30"})),
    ("cancel my timer", "en", ("cancel_timer", {"kind": "timer"})),
    ("what timers do I have", "en", ("list_timers", {})),
    ("stop", "en", ("stop", {})),
    ("Stop!", "en", ("stop", {})),
    ("Tell me a story about a little rabbit.", "en", None),
    ("今天天气怎么样？", "zh", None),
    ("Don't stop believing, tell me a story", "en", None),
])
def test_offline_rules(text: str, lang: str, expected: Any) -> None:
    assert match(text, lang) == expected


def test_numbers_in_words() -> None:
    assert [parse_number(w) for w in ("12", "twelve", "twenty five", "十二", "两", "四十五", "一百", "blue")] == [
        12, 12, 25, 12, 2, 45, 100, None]


async def test_the_offline_responder_calls_the_tool_and_says_the_result() -> None:
    responder = OfflineResponder(clock=lambda: datetime(2026, 3, 3, 9, 5, tzinfo=SHANGHAI))
    registry = ToolRegistry([BuiltinTools()])
    outcomes: list = []
    context = ToolContext("dev", "zh", SHANGHAI)
    text = "".join([d async for d in converse(responder, [{"role": "user", "content": "几点了"}], registry,
                                              context, max_rounds=3, outcomes=outcomes)])
    now = datetime.now(SHANGHAI)
    assert [o.name for o in outcomes] == ["get_time"]
    assert f"{now.hour % 12 or 12}点" in text and f"{now.month}月{now.day}日" in text


# -- timers -------------------------------------------------------------------------------------------------


class _MemoryTimerStore:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}

    async def save_timer(self, row: dict[str, Any]) -> None:
        self.rows.setdefault(row["timer_id"], dict(row))

    async def set_timer_state(self, timer_id: str, state: str, at: float) -> None:
        await self.claim_timer(timer_id, state, at)

    async def claim_timer(self, timer_id: str, state: str, at: float) -> bool | None:
        row = self.rows.get(timer_id)
        if row is None:
            return None
        if row["state"] != "pending":
            return False
        row["state"] = state
        return True

    async def load_pending_timers(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows.values() if r["state"] == "pending"]


class _Clock:
    """Wall-clock seconds that move with trio's (autojump) clock."""

    def __init__(self) -> None:
        self.origin = trio.current_time()

    def __call__(self) -> float:
        return time.time() + trio.current_time() - self.origin


async def test_timers_fire_survive_a_restart_wait_for_an_offline_device_and_are_dropped_after_grace(
        autojump_clock) -> None:
    store, clock = _MemoryTimerStore(), _Clock()
    heard: list[tuple[str, str, str]] = []
    online: set[str] = set()

    def find(device_id: str):
        if device_id not in online:
            return None

        async def announce(text: str, lang: str, data: dict[str, Any]) -> None:
            heard.append((device_id, text, data["kind"]))
        return announce

    def book() -> TimerBook:
        return TimerBook(store, find, tz=SHANGHAI, grace_s=60, clock=clock)

    first = book()
    tools = TimerTools(first)
    online.update({"kitchen", "bedroom"})
    context = ToolContext("kitchen", "en", SHANGHAI)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await tools.call("set_timer", {"seconds": 3}, context)
        await tools.call("set_timer", {"seconds": 30, "label": "tea"}, context)
        await tools.call("set_timer", {"seconds": 100}, ToolContext("bedroom", "zh", SHANGHAI))
        listed = await tools.call("list_timers", {}, context)
        assert [t["remaining_s"] for t in listed["timers"]] == [3, 30]
        await trio.sleep(3.5)
        assert heard == [("kitchen", "Time's up! The timer for 3 seconds is done.", "timer")]
        nursery.cancel_scope.cancel()  # the server stops
    # A new process loads what was stored; the kitchen is offline when the tea timer is due.
    online.clear()
    second = book()
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        await second.loaded.wait()
        assert {t.label for t in second.pending("kitchen")} == {"tea"}
        await trio.sleep(40)
        assert len(heard) == 1  # held for the device
        online.add("kitchen")
        second.device_online("kitchen")
        await trio.sleep(0.1)
        assert heard[-1] == ("kitchen", "Time's up! Your tea timer is done.", "timer")
        await trio.sleep(200)  # the bedroom never came back: dropped after the grace period
        assert len(heard) == 2 and second.pending("bedroom") == []
        nursery.cancel_scope.cancel()
    assert sorted(r["state"] for r in store.rows.values()) == ["dropped", "fired", "fired"]


async def test_alarm_is_set_for_the_next_time_that_time_comes_and_cancelled() -> None:
    store = _MemoryTimerStore()
    book = TimerBook(store, lambda _d: None, tz=SHANGHAI, grace_s=60)
    tools = TimerTools(book)
    context = ToolContext("dev", "zh", SHANGHAI)
    now = context.now()
    earlier = f"{(now.hour - 1) % 24:02d}:00"
    result = await tools.call("set_alarm", {"time": earlier}, context)
    assert result["day"] == "tomorrow" or now.hour == 0
    assert result["rings_at"].startswith(f"{(now.hour - 1) % 24:02d}:00", 11)
    cancelled = await tools.call("cancel_timer", {"kind": "alarm"}, context)
    assert len(cancelled["cancelled"]) == 1 and book.pending("dev") == []
    with pytest.raises(ToolError):
        await tools.call("cancel_timer", {}, context)


def test_reminder_words() -> None:
    moment = datetime(2026, 1, 1, 7, 0, tzinfo=SHANGHAI)
    alarm = Timer("a", "d", "alarm", moment.timestamp(), 0, language="zh")
    assert reminder_text(alarm, moment) == "现在是上午7点，该起床了。"
    timer = Timer("t", "d", "timer", 0, 0, language="zh", duration_s=300)
    assert reminder_text(timer, moment, late_s=180) == "时间到了！5分钟的计时结束了。这个提醒晚了3分钟。"


# -- MCP ---------------------------------------------------------------------------------------------------


def test_mcp_servers_setting_json_and_compact() -> None:
    json_form = parse_mcp_servers('{"mcpServers": {"files": {"command": "python", "args": ["-m", "srv"], '
                                  '"env": {"K": "v"}}, "web": {"url": "https://h/mcp", "headers": {"A": "b"}}}}')
    assert json_form == [McpServerConfig("files", "python", ("-m", "srv"), (("K", "v"),)),
                         McpServerConfig("web", url="https://h/mcp", headers=(("A", "b"),))]
    compact = parse_mcp_servers("files=python -m 'my srv'; web=http://h:9/mcp")
    assert compact == [McpServerConfig("files", "python", ("-m", "my srv")), McpServerConfig("web", url="http://h:9/mcp")]
    for bad in ('{"x": {}}', '{"x y": {"command": "a"}}', "x", '{"a": {"command": "c", "url": "http://h"}}',
                "a=c; a=d", '{"a": {"url": "ftp://h"}}', "{not json"):
        with pytest.raises(McpConfigError):
            parse_mcp_servers(bad)
    with pytest.raises(ConfigError, match="MCP_SERVERS"):
        load_settings({"MCP_SERVERS": "{broken"}, env_file=None)
    with pytest.raises(ConfigError, match="TZ"):
        load_settings({"TZ": "Mars/Olympus"}, env_file=None)


async def test_a_stdio_mcp_server_offers_tools_and_answers_calls() -> None:
    tiny = McpTools(McpServerConfig("tiny", sys.executable, (str(TINY_SERVER),)), timeout_s=3.0)
    registry = ToolRegistry([BuiltinTools(), tiny])
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        with trio.fail_after(30):
            await tiny.connected.wait()
        names = {spec.name for spec in registry.specs()}
        assert {"tiny__add", "tiny__fail", "tiny__slow", "stop", "set_volume"} <= names
        added = await registry.call(ToolCall("c", "tiny__add", '{"a": 2, "b": 40}'), _context())
        failed = await registry.call(ToolCall("c", "tiny__fail", "{}"), _context())
        slow = await registry.call(ToolCall("c", "tiny__slow", '{"seconds": 10}'), _context())
        wrong = await registry.call(ToolCall("c", "tiny__add", '{"a": "two"}'), _context())
        nursery.cancel_scope.cancel()
    assert added.ok and added.result == "2 plus 40 is 42"
    assert not failed.ok and "error" in json.loads(failed.result)
    assert not slow.ok and "did not answer within 3" in slow.result
    assert not wrong.ok and "invalid arguments" in wrong.result  # checked against the server's own schema


async def test_a_missing_mcp_server_offers_nothing_and_calls_fail_cleanly() -> None:
    gone = McpTools(McpServerConfig("gone", sys.executable, ("-c", "import sys; sys.exit(3)")), timeout_s=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(gone.run)
        await trio.sleep(1.0)
        assert gone.list_tools() == []
        with pytest.raises(ToolError, match="not connected"):
            await gone.call("gone__x", {}, _context())
        nursery.cancel_scope.cancel()


# -- a device's own tools (xiaozhi boards) ----------------------------------------------------------------


async def test_a_devices_own_mcp_tools_join_the_registry_for_its_turns() -> None:
    from voicegrow.streaming.device_mcp import DeviceTool, DeviceToolError, ToolResult
    from voicegrow.tools.device import DeviceTools

    class Board:
        tools = [DeviceTool("self.audio_speaker.set_volume", "Set the volume",
                            {"type": "object", "required": ["volume"],
                             "properties": {"volume": {"type": "integer", "minimum": 0, "maximum": 100}}}),
                 DeviceTool("self.light.toggle", "Toggle the light", {"type": "object", "properties": {}})]

        def __init__(self) -> None:
            self.calls: list[tuple[str, dict]] = []

        async def call(self, name: str, arguments: dict) -> ToolResult:
            self.calls.append((name, arguments))
            if name == "self.light.toggle":
                raise DeviceToolError("timeout", "no answer within 5 s")
            return ToolResult(text="true", is_error=False, raw={})

    board = Board()
    server = ToolRegistry([BuiltinTools()])
    joined = server.with_providers([DeviceTools(board)])
    names = {spec.name for spec in joined.specs()}
    assert {"device__self_audio_speaker_set_volume", "device__self_light_toggle", "stop"} <= names
    assert "device__self_light_toggle" not in {spec.name for spec in server.specs()}  # only this device's turns
    ok = await joined.call(ToolCall("c", "device__self_audio_speaker_set_volume", '{"volume": 20}'), _context())
    refused = await joined.call(ToolCall("c", "device__self_audio_speaker_set_volume", '{"volume": 200}'), _context())
    timed_out = await joined.call(ToolCall("c", "device__self_light_toggle", "{}"), _context())
    assert ok.ok and ok.result == "true"
    assert not refused.ok and "invalid arguments" in refused.result
    assert not timed_out.ok and "no answer within 5 s" in timed_out.result
    assert board.calls == [("self.audio_speaker.set_volume", {"volume": 20}), ("self.light.toggle", {})]


async def test_the_fake_refuses_malformed_scripted_tool_calls() -> None:
    config = FakeAiConfig()
    for bad in ({"tool_calls": "set_timer"}, {"tool_calls": [{"arguments": "{}"}]}, {"tool_calls": [3]}):
        with pytest.raises(ValueError, match="tool_calls"):
            config.update(bad)
    config.update({"tool_calls": [{"name": "stop"}], "tool_triggers": True})
    assert config.tool_calls == [{"name": "stop"}]


async def test_a_server_that_refuses_tools_still_gets_the_question_without_them() -> None:
    class NoFunctions(_ScriptedModel):
        async def stream(self, messages, tools=None, tool_choice=None):
            self.requests.append(([dict(m) for m in messages], tool_choice))
            if tools:
                raise LlmError("http_4xx", "HTTP 400: auto tool choice requires --enable-auto-tool-choice")
            yield "Plain answer."

    model = NoFunctions([])
    text, outcomes = await _converse(model, ToolRegistry([BuiltinTools()]))
    assert text == "Plain answer." and outcomes == [] and len(model.requests) == 2
