"""Tools end to end on a real server: timers that fire (also after a restart), volume on both
protocols, an MCP server's tool, and the offline responder with nothing configured.

The native client types its questions (the ``text`` event) where the words matter and the audio
does not; the open-xiaoai emulator can only speak, so its tests go through VAD and Whisper.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from bench.xiaoai_emulator import DEFAULT_SERIAL, run_emulator
from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.audio import read_wav
from voicegrow.client import NativeClient, open_native_client, stream_wav_and_collect
from voicegrow.protocol import native as wire
from voicegrow.protocol import xiaoai as proto

TINY_SERVER = Path(__file__).with_name("mcp_tiny_server.py")
QUICK = dict(ttft_ms=50, tokens_per_s=200, tts_ms_per_char=10)


def _clip(audio_fixtures: Path, clip_id: str, manifest: list[dict]) -> bytes:
    entry = next(e for e in manifest if e["id"] == clip_id)
    samples, rate = read_wav(audio_fixtures / entry["file"])
    assert rate == 16000
    return samples.astype("<i2").tobytes()


class _Frames:
    """Everything a native client received, with arrival times, grouped by turn."""

    def __init__(self) -> None:
        self.items: list[tuple[float, wire.Frame]] = []

    def events(self, name: str) -> list[tuple[float, wire.Control]]:
        return [(t, f) for t, f in self.items if isinstance(f, wire.Control) and f.event == name]

    def audio_bytes(self, turn_id: int) -> int:
        return sum(len(f.pcm) for _, f in self.items if isinstance(f, wire.Audio) and f.turn_id == turn_id)

    def text(self, turn_id: int) -> str:
        return "".join(f.data["text"] for _, f in self.events("llm_text") if f.turn_id == turn_id)

    def turn_ends(self) -> list[wire.Control]:
        return [f for _, f in self.events("turn_end")]


async def _read_until(client: NativeClient, frames: _Frames, done: Callable[[_Frames], bool],
                      timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not done(frames):
            frame = await client.next_frame()
            frames.items.append((trio.current_time(), frame))


def _announced(count: int = 1) -> Callable[[_Frames], bool]:
    """Until ``count`` announcement turns have ended."""
    def done(frames: _Frames) -> bool:
        ids = {f.turn_id for _, f in frames.events("announcement")}
        return len([f for f in frames.turn_ends() if f.turn_id in ids]) >= count
    return done


def _turns_ended(count: int) -> Callable[[_Frames], bool]:
    return lambda frames: len(frames.turn_ends()) >= count


def _chats(ai: Any) -> list[dict[str, Any]]:
    return [r["body"] for r in ai.requests if r["path"].endswith("/chat/completions")]


# -- native: a timer through the fake LLM's streamed tool call ---------------------------------------------


async def test_a_timer_set_by_the_llm_fires_on_a_native_device_and_survives_a_restart(tmp_path) -> None:
    async with run_fake_ai(FakeAiConfig(**QUICK, tool_triggers=True)) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url)
        async with running_server(settings) as server:
            async with open_native_client(server.ws_url, device_id="kitchen") as client:
                frames = _Frames()
                asked_at = trio.current_time()
                await client.send_control("text", {"text": "Set a timer for 3 seconds."})
                await _read_until(client, frames, _announced())
            first_chat, second_chat = _chats(ai)[:2]
            # The model was offered the tools, called one, and was told the result.
            assert "set_timer" in {t["function"]["name"] for t in first_chat["tools"]}
            assert second_chat["messages"][-2]["tool_calls"][0]["function"]["name"] == "set_timer"
            assert json.loads(second_chat["messages"][-1]["content"])["seconds"] == 3
            confirmation = frames.turn_ends()[0].turn_id
            assert '"seconds": 3' in frames.text(confirmation) and frames.audio_bytes(confirmation) > 0
            (fired_at, announcement), = frames.events("announcement")
            assert announcement.data["kind"] == "timer"
            assert announcement.data["text"] == "Time's up! The timer for 3 seconds is done."
            assert fired_at - asked_at >= 2.9  # not before it was due
            assert frames.audio_bytes(announcement.turn_id) > 0  # and it was spoken
            assert server.services.metrics.reminders.labels("fired")._value.get() == 1
            # The turn record keeps the tool call (admin API).
            await server.services.persistence.wait_delivered()
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                turns = (await http.get("/api/v1/conversations", params={"device_id": "kitchen"})).json()["turns"]
                (turn,) = turns
                assert [c["name"] for c in turn["tool_calls"]] == ["set_timer"] and turn["tool_calls"][0]["ok"]
                timers = (await http.get("/api/v1/devices/kitchen/timers")).json()["timers"]
                assert [(t["kind"], t["state"]) for t in timers] == [("timer", "fired")]

            # Set another, and stop the server before it is due.
            async with open_native_client(server.ws_url, device_id="kitchen") as client:
                frames = _Frames()
                await client.send_control("text", {"text": "Set a timer for 6 seconds."})
                await _read_until(client, frames, _turns_ended(1))
        async with running_server(settings) as server:  # a new process, as far as timers go
            async with open_native_client(server.ws_url, device_id="kitchen") as client:
                frames = _Frames()
                await _read_until(client, frames, _announced())
            (_, announcement), = frames.events("announcement")
            assert announcement.data["text"] == "Time's up! The timer for 6 seconds is done."
            assert frames.audio_bytes(announcement.turn_id) > 0
            await server.services.persistence.wait_delivered()
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                timers = (await http.get("/api/v1/devices/kitchen/timers")).json()["timers"]
                assert [t["state"] for t in timers] == ["fired", "fired"]
                erased = (await http.delete("/api/v1/devices/kitchen/data")).json()
                assert erased["timers"] == 2
                assert (await http.get("/api/v1/devices/kitchen/timers")).json()["timers"] == []


async def test_the_volume_tool_reaches_a_native_device_as_a_control_event(tmp_path) -> None:
    fake = FakeAiConfig(**QUICK, tool_calls=[{"name": "set_volume", "arguments": {"action": "set", "level": 30}}])
    async with run_fake_ai(fake) as ai:
        async with running_server(make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url)) as server:
            async with open_native_client(server.ws_url, device_id="den") as client:
                frames = _Frames()
                await client.send_control("text", {"text": "Make it quieter."})
                await _read_until(client, frames, _turns_ended(1))
                ai.config.tool_calls = [{"name": "set_volume", "arguments": '{"action": "set", "level": "0; reboot"}'}]
                await client.send_control("text", {"text": "Make it quieter."})
                await _read_until(client, frames, _turns_ended(2))
    assert [f.data for _, f in frames.events("volume")] == [{"level": 30}]
    refused = _chats(ai)[-1]["messages"][-1]
    assert refused["role"] == "tool" and "invalid arguments" in refused["content"]


async def test_an_mcp_tool_is_called_and_its_result_spoken(tmp_path) -> None:
    fake = FakeAiConfig(**QUICK, tool_calls=[{"name": "tiny__add", "arguments": {"a": 2, "b": 40}}])
    async with run_fake_ai(fake) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url,
                                 mcp_servers=f"tiny={sys.executable} {TINY_SERVER}")
        async with running_server(settings) as server:
            (tiny,) = [p for p in server.services.tools.providers if getattr(p, "config", None)]
            with trio.fail_after(30):
                await tiny.connected.wait()
            async with open_native_client(server.ws_url, device_id="study") as client:
                frames = _Frames()
                await client.send_control("text", {"text": "What is two plus forty?"})
                await _read_until(client, frames, _turns_ended(1))
                ai.config.tool_calls = [{"name": "tiny__fail", "arguments": {}}]
                await client.send_control("text", {"text": "Try the broken one."})
                await _read_until(client, frames, _turns_ended(2))
    first, second = (f.turn_id for f in frames.turn_ends())
    assert "tiny__add" in {t["function"]["name"] for t in _chats(ai)[0]["tools"]}
    assert "2 plus 40 is 42" in frames.text(first) and frames.audio_bytes(first) > 0
    told = _chats(ai)[-1]["messages"][-1]
    assert told["role"] == "tool" and "error" in json.loads(told["content"])
    assert frames.text(second) and frames.audio_bytes(second) > 0  # said, not silence
    calls = server.services.metrics.tool_calls
    assert [calls.labels("mcp", o)._value.get() for o in ("ok", "error")] == [1, 1]


async def test_a_barge_in_during_a_tool_call_cancels_it_and_leaves_no_half_exchange(tmp_path) -> None:
    fake = FakeAiConfig(**QUICK, tool_calls=[{"name": "tiny__slow", "arguments": {"seconds": 5}}])
    async with run_fake_ai(fake) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url,
                                 mcp_servers=f"tiny={sys.executable} {TINY_SERVER}")
        async with running_server(settings) as server:
            (tiny,) = [p for p in server.services.tools.providers if getattr(p, "config", None)]
            with trio.fail_after(30):
                await tiny.connected.wait()
            async with open_native_client(server.ws_url, device_id="patient") as client:
                frames = _Frames()
                await client.send_control("text", {"text": "Take your time."})
                with trio.fail_after(10):
                    while not _chats(ai):
                        await trio.sleep(0.02)
                await trio.sleep(0.5)  # the slow call is under way
                await client.send_control("abort")
                await _read_until(client, frames, _turns_ended(1))
                ai.config.tool_calls = [{"name": "tiny__add", "arguments": {"a": 1, "b": 1}}]
                await client.send_control("text", {"text": "Then just add."})
                await _read_until(client, frames, _turns_ended(2))
    interrupted, added = frames.turn_ends()
    assert interrupted.data["outcome"] == "interrupted"
    assert "1 plus 1 is 2" in frames.text(added.turn_id)  # the MCP connection survived the cancelled call
    # The next prompt holds nothing of the interrupted turn: no tool call without its result.
    next_prompt = _chats(ai)[1]["messages"]
    assert next_prompt[-1] == {"role": "user", "content": "Then just add."}
    assert not [m for m in next_prompt if m["role"] == "tool" or m.get("tool_calls") or
                m.get("content") == "Take your time."]


# -- the offline responder, with nothing configured ---------------------------------------------------


async def test_offline_with_nothing_configured_tells_the_time_and_fires_a_spoken_timer(tmp_path) -> None:
    async with running_server(make_settings(tmp_path)) as server:  # no LLM, no TTS service: piper speaks
        zone = ZoneInfo(server.services.settings.tz)
        async with open_native_client(server.ws_url, device_id="offline") as client:
            frames = _Frames()
            await client.send_control("text", {"text": "what time is it"})
            await _read_until(client, frames, _turns_ended(1), timeout=60)
            asked_at = trio.current_time()
            await client.send_control("text", {"text": "set a timer for ten seconds"})
            await _read_until(client, frames, _announced(), timeout=60)
    time_turn, timer_turn = (f.turn_id for f in frames.turn_ends()[:2])
    now = datetime.now(zone)
    assert f"{now.hour % 12 or 12}:" in frames.text(time_turn) and now.strftime("%A") in frames.text(time_turn)
    assert frames.audio_bytes(time_turn) > 0
    assert frames.text(timer_turn) == "OK, a 10 seconds timer is running."
    (fired_at, announcement), = frames.events("announcement")
    assert fired_at - asked_at >= 9.9
    assert frames.audio_bytes(announcement.turn_id) > 0


async def test_offline_in_chinese_tells_the_time_and_sets_a_timer(tmp_path) -> None:
    async with run_fake_ai(FakeAiConfig(**QUICK)) as ai:  # TTS only (the Mandarin voice is slow to load here)
        async with running_server(make_settings(tmp_path, tts_base_url=ai.url)) as server:
            zone = ZoneInfo(server.services.settings.tz)
            async with open_native_client(server.ws_url, device_id="offline-zh") as client:
                frames = _Frames()
                await client.send_control("text", {"text": "几点了"})
                await _read_until(client, frames, _turns_ended(1))
                await client.send_control("text", {"text": "定一个五分钟的计时器"})
                await _read_until(client, frames, _turns_ended(2))
            (pending,) = server.services.timers.pending("offline-zh")
    time_turn, timer_turn = (f.turn_id for f in frames.turn_ends())
    now = datetime.now(zone)
    assert f"{now.hour % 12 or 12}点" in frames.text(time_turn) and f"{now.month}月{now.day}日" in frames.text(time_turn)
    assert frames.audio_bytes(time_turn) > 0
    assert frames.text(timer_turn) == "好的，5分钟的计时开始了。" and pending.duration_s == 300


@pytest.mark.slow
async def test_offline_spoken_volume_request_goes_through_asr_to_the_device(tmp_path, audio_fixtures,
                                                                              manifest) -> None:
    async with run_fake_ai(FakeAiConfig(**QUICK)) as ai:  # TTS only: the LLM is the offline responder
        settings = make_settings(tmp_path, tts_base_url=ai.url, asr_preload="true")
        async with running_server(settings) as server:
            with trio.fail_after(120):
                await server.services.asr.warm_up()
            async with open_native_client(server.ws_url, device_id="hall") as client:
                result = await stream_wav_and_collect(client, _clip(audio_fixtures, "en-02", manifest), speed=2.0,
                                                      timeout_s=60)
    assert "volume" in result.transcript.lower()
    assert [e.data for e in result.events if e.event == "volume"] == [{"level": 35}]
    assert result.reply == "OK, volume 35." and result.reply_audio_s > 0


# -- open-xiaoai: spoken requests through VAD and Whisper ------------------------------------------------------


@pytest.mark.slow
async def test_open_xiaoai_volume_and_a_timer_that_survives_a_restart(tmp_path, audio_fixtures, manifest) -> None:
    clip = _clip(audio_fixtures, "en-05", manifest)  # "Tell me a joke." — the fake decides what to call
    fake = FakeAiConfig(**QUICK, tool_calls=[{"name": "set_volume", "arguments": {"action": "set", "level": 30}}])
    async with run_fake_ai(fake) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url, asr_preload="true")
        completed = lambda server: server.services.metrics.turns.labels("completed")._value.get()  # noqa: E731
        device = "xiaoai-" + DEFAULT_SERIAL.replace("/", "_")

        async def wait_for(predicate: Callable[[], bool], timeout: float = 60) -> None:
            with trio.fail_after(timeout):
                while not predicate():
                    await trio.sleep(0.05)

        async with running_server(settings) as server:
            with trio.fail_after(120):
                await server.services.asr.warm_up()
            async with run_emulator(server.ws_url) as emu:
                await emu.wait_for_request("start_play")
                await emu.stream_pcm(clip, realtime=False)
                await wait_for(lambda: completed(server) == 1)
                assert emu.volume == 30
                scripts = [r.payload for r in emu.requests_seen if r.command == "run_shell"]
                assert proto.volume_command("LX06", 30) in scripts
                for turns, bad in enumerate(('{"action": "set", "level": "30; reboot"}',
                                             '{"action": "set", "level": 150}'), start=2):
                    ai.config.tool_calls = [{"name": "set_volume", "arguments": bad}]
                    await emu.stream_pcm(clip, realtime=False)
                    await wait_for(lambda: completed(server) == turns and len(_chats(ai)) == 2 * turns)
                    told = _chats(ai)[-1]["messages"][-1]
                    assert told["role"] == "tool" and "invalid arguments" in told["content"]
                assert emu.volume == 30
                assert not any("reboot" in s or "150" in s for s in
                               (r.payload for r in emu.requests_seen if r.command == "run_shell"))

                # A timer: set, then heard about 3 s later.
                ai.config.tool_calls = [{"name": "set_timer", "arguments": {"seconds": 3}}]
                await emu.stream_pcm(clip, realtime=False)
                await wait_for(lambda: completed(server) == 4)
                (timer,) = server.services.timers.pending(device)
                played = len(emu.played_pcm)
                await wait_for(lambda: completed(server) == 5, timeout=30)  # the reminder's own turn
                assert time.time() >= timer.due_at  # not before it was due
                await wait_for(lambda: len(emu.played_pcm) > played, timeout=10)

                # Another, and the server goes away before it is due.
                ai.config.tool_calls = [{"name": "set_timer", "arguments": {"seconds": 8}}]
                await emu.stream_pcm(clip, realtime=False)
                await wait_for(lambda: completed(server) == 6)
        async with running_server(settings) as server:
            async with run_emulator(server.ws_url) as emu:  # the speaker reconnects to the new process
                await emu.wait_for_request("start_play")
                await wait_for(lambda: completed(server) == 1, timeout=30)
                await wait_for(lambda: len(emu.played_pcm) > 0, timeout=10)
            await server.services.persistence.wait_delivered()
            timers = await server.services.persistence.list_timers(device)
            assert [t["state"] for t in timers] == ["fired", "fired"]
