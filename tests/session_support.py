"""Helpers of the device-session tests (open-xiaoai, xiaozhi): a server to talk to, and polling it.

A driver's own behaviour needs only :func:`plain_server`; a conversation needs the model warmed up and
the fake LLM/TTS service of ``bench`` (:func:`server_with_fake_ai`). Polling has a deadline, never a
fixed sleep, so the tests hold on a slow CI machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from tests.conftest import make_settings
from voicegrow.app import ServerHandle, running_server

__all__ = ["SHORT_REPLIES", "completed_turns", "counter_value", "plain_server", "server_with_fake_ai", "wait_for"]

#: Replies that start fast and stay short, so a conversation test spends its time on ASR, not waiting.
SHORT_REPLIES = FakeAiConfig(ttft_ms=100, tokens_per_s=80, tts_ms_per_char=15)


def counter_value(counter: Any) -> float:
    """A prometheus counter's (or one label set's) current value."""
    return float(counter._value.get())


def completed_turns(server: ServerHandle) -> float:
    return counter_value(server.services.metrics.turns.labels("completed"))


async def wait_for(predicate: Callable[[], object], *, timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fails the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


@contextlib.asynccontextmanager
async def plain_server(tmp_path: Path, **overrides: object) -> AsyncIterator[ServerHandle]:
    """A server without the model or the AI service, for the driver's own behaviour."""
    async with running_server(make_settings(tmp_path, **overrides)) as server:
        yield server


@contextlib.asynccontextmanager
async def server_with_fake_ai(tmp_path: Path, fake: FakeAiConfig = SHORT_REPLIES,
                              **overrides: object) -> AsyncIterator[tuple[ServerHandle, Any]]:
    """A server whose ASR is warm and whose LLM and TTS are the fake service ``fake``."""
    async with run_fake_ai(fake) as ai:
        settings = make_settings(tmp_path, llm_base_url=ai.url, tts_base_url=ai.url, asr_preload="true",
                                 **overrides)
        async with running_server(settings) as server:
            with trio.fail_after(120):
                await server.services.asr.warm_up()
            yield server, ai
