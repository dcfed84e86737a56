"""A turn's conversation with the model when tools are on offer: text out, calls run, until it answers.

Round by round: stream the model's answer (its text goes straight on to the sentence splitter,
so words said before a call are spoken at once); if the answer ends in tool calls, run them in
order, append the assistant message with its calls and one ``tool`` message per call, and ask again.
After ``max_rounds`` rounds of calls the model is asked with ``tool_choice="none"`` so that it has
to answer in words. These messages live only inside the turn: the session history keeps the user's
words and what was spoken, so a barge-in can never leave a call without its result in a prompt.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from voicegrow.pipeline.llm import LanguageModel, LlmError, ToolCalls, apology
from voicegrow.tools.registry import ToolContext, ToolOutcome, ToolRegistry

__all__ = ["converse", "done_phrase"]

log = logging.getLogger(__name__)


def done_phrase(lang: str) -> str:
    """What to say when the tools did their work and the model said nothing."""
    return "好的。" if lang.startswith("zh") else "Done."


async def converse(llm: LanguageModel, messages: Sequence[Mapping[str, Any]], registry: ToolRegistry | None,
                   context: ToolContext, *, max_rounds: int, outcomes: list[ToolOutcome]) -> AsyncIterator[str]:
    """Text deltas of the answer; every call made is appended to ``outcomes`` as it finishes.

    Without a registry (or with no tools in it) this is the plain text stream of ``llm``.
    """
    tools = registry.openai_tools() if registry is not None else []
    if not tools:
        async with contextlib.aclosing(_plain(llm, messages)) as deltas:
            async for delta in deltas:
                yield delta
        return
    assert registry is not None
    conversation = [dict(m) for m in messages]
    spoken = False
    failed = False
    for round_number in range(max_rounds + 1):
        choice = "none" if round_number == max_rounds else None
        text, batch = "", None
        try:
            async with contextlib.aclosing(llm.stream(conversation, tools=tools, tool_choice=choice)) as items:
                async for item in items:
                    if isinstance(item, ToolCalls):
                        batch = item
                    elif item:
                        text += item
                        spoken = True
                        yield item
        except LlmError as exc:
            if exc.reason != "http_4xx" or round_number or spoken:
                raise
            # A server without function calling (vLLM without a tool parser, …) refuses the request:
            # the user still gets an answer, and the operator a hint.
            log.warning("the LLM refused a request with tools (%s); answering without them "
                        "(set LLM_TOOLS=false if it cannot call functions)", exc)
            async with contextlib.aclosing(_plain(llm, messages)) as deltas:
                async for delta in deltas:
                    yield delta
            return
        if batch is None or choice == "none":
            break
        conversation.append({"role": "assistant", "content": text or None,
                             "tool_calls": [call.message_part() for call in batch.calls]})
        for call in batch.calls:
            outcome = await registry.call(call, context)
            outcomes.append(outcome)
            failed = failed or not outcome.ok
            conversation.append({"role": "tool", "tool_call_id": call.id, "content": outcome.result})
        if context.silenced:
            return  # "stop": nothing more is said
    if not spoken and outcomes:
        yield apology(context.language) if failed else done_phrase(context.language)



async def _plain(llm: LanguageModel, messages: Sequence[Mapping[str, Any]]) -> AsyncIterator[str]:
    async with contextlib.aclosing(llm.stream(messages)) as deltas:
        async for delta in deltas:
            if isinstance(delta, str):
                yield delta
