"""Tools the language model may call: their specs, the providers behind them, and how a call runs.

A provider is anything with ``list_tools()`` and ``call()`` (the built-ins, each MCP server, and a
device's own tools): the registry merges their specs into the OpenAI ``tools`` list, and runs each
call the model makes through the same gate: the arguments are parsed and checked against the tool's
JSON schema before the provider sees them, the call is bounded by a timeout, and every failure comes
back as a short error text for the model instead of an exception for the turn. A provider may have a
lifetime (an MCP connection): its ``run`` method, if any, is started once with the server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, Protocol, runtime_checkable

import jsonschema
import trio

from voicegrow.pipeline.llm import ToolCall

__all__ = ["ToolContext", "ToolError", "ToolOutcome", "ToolProvider", "ToolRegistry", "ToolSpec"]

log = logging.getLogger(__name__)

#: What a tool result may grow to before it is cut (it goes into the next prompt).
MAX_RESULT_CHARS = 4000


@dataclass(frozen=True)
class ToolSpec:
    """One function as the model sees it.

    ``name``: 1–64 characters of ``A–Z a–z 0–9 _ -`` (the OpenAI rule). ``parameters``: a JSON
    schema of type ``object``. ``mutating``: the call changes something (a timer, the volume); it is
    then run to completion even when a barge-in cancels the turn, so that what the user was told
    and what happened never disagree by half. ``timeout_s``: None for the registry's default.
    """

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    mutating: bool = False
    timeout_s: float | None = None

    def openai(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


class ToolError(Exception):
    """A tool refused or failed; the message is told to the model (keep it short and free of secrets)."""


@runtime_checkable
class DeviceVolume(Protocol):
    """A device link that can set its speaker's volume (0–100)."""

    async def set_volume(self, level: int) -> None: ...


@dataclass
class ToolContext:
    """What a call may know and touch: the device it serves, the user's language and time zone.

    ``device`` is the turn's device link (any object; tools look for the capability they need, such
    as :class:`DeviceVolume`). A tool that ends the reply (``stop``) sets ``silenced``.
    """

    device_id: str
    language: str
    tz: tzinfo
    device: Any = None
    silenced: bool = False

    def now(self) -> datetime:
        return datetime.now(self.tz)


class ToolProvider(Protocol):
    """A source of tools. ``call`` returns text or a JSON-able object, or raises :class:`ToolError`."""

    def list_tools(self) -> Sequence[ToolSpec]: ...

    async def call(self, name: str, arguments: dict[str, Any], context: ToolContext) -> Any: ...


@dataclass
class ToolOutcome:
    """One call as it went: what the model asked, what it was told, how long it took."""

    call_id: str
    name: str
    arguments: Any
    ok: bool
    result: str
    ms: float

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ToolRegistry:
    def __init__(self, providers: Sequence[ToolProvider] = (), *, timeout_s: float = 10.0) -> None:
        self.providers = list(providers)
        self.timeout_s = timeout_s
        self._warned: set[str] = set()

    def add(self, provider: ToolProvider) -> None:
        self.providers.append(provider)

    def with_providers(self, extra: Sequence[ToolProvider]) -> ToolRegistry:
        """This registry plus ``extra`` (one device's own tools, for that device's turns)."""
        if not extra:
            return self
        joined = ToolRegistry([*self.providers, *extra], timeout_s=self.timeout_s)
        joined._warned = self._warned
        return joined

    def _table(self) -> dict[str, tuple[ToolSpec, ToolProvider]]:
        """Name → (spec, provider); on a clash the provider added first keeps the name."""
        table: dict[str, tuple[ToolSpec, ToolProvider]] = {}
        for provider in self.providers:
            for spec in provider.list_tools():
                if spec.name in table:
                    if spec.name not in self._warned:
                        self._warned.add(spec.name)
                        log.warning("two tool providers offer %r; the first one keeps it", spec.name)
                    continue
                table[spec.name] = (spec, provider)
        return table

    def specs(self) -> list[ToolSpec]:
        return [spec for spec, _ in self._table().values()]

    def openai_tools(self) -> list[dict[str, Any]]:
        return [spec.openai() for spec in self.specs()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the providers that have a lifetime (``run``) until cancelled."""
        async with trio.open_nursery() as nursery:
            for provider in self.providers:
                runner = getattr(provider, "run", None)
                if runner is not None:
                    nursery.start_soon(runner)
            task_status.started()

    async def call(self, call: ToolCall, context: ToolContext) -> ToolOutcome:
        """Run one call; never raises except for cancellation."""
        started = trio.current_time()
        arguments: Any = call.arguments

        def outcome(ok: bool, result: Any) -> ToolOutcome:
            text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
            if len(text) > MAX_RESULT_CHARS:
                text = text[:MAX_RESULT_CHARS] + "…"
            return ToolOutcome(call.id, call.name, arguments, ok, text,
                               round((trio.current_time() - started) * 1000, 1))

        entry = self._table().get(call.name)
        if entry is None:
            return outcome(False, {"error": f"there is no tool named {call.name[:64]!r}"})
        spec, provider = entry
        try:
            arguments = json.loads(call.arguments or "{}")
        except ValueError:
            return outcome(False, {"error": "the arguments are not valid JSON"})
        if not isinstance(arguments, dict):
            return outcome(False, {"error": "the arguments must be a JSON object"})
        problem = _schema_problem(spec.parameters, arguments)
        if problem:
            return outcome(False, {"error": f"invalid arguments: {problem}"})
        timeout = spec.timeout_s or self.timeout_s
        try:
            # A mutating call finishes even if the turn is cancelled meanwhile (bounded by its timeout).
            with trio.CancelScope(shield=spec.mutating), trio.fail_after(timeout):
                result = await provider.call(call.name, arguments, context)
        except ToolError as exc:
            return outcome(False, {"error": str(exc)[:500]})
        except trio.TooSlowError:
            log.warning("tool %s timed out after %g s", call.name, timeout)
            return outcome(False, {"error": f"the tool did not answer within {timeout:g} seconds"})
        except Exception as exc:
            log.exception("tool %s failed", call.name)
            return outcome(False, {"error": f"the tool failed ({type(exc).__name__})"})
        return outcome(True, "" if result is None else result)


def _schema_problem(schema: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """The first way ``arguments`` break ``schema``, in words, or None."""
    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path)
        return f"{where}: {error.message}"[:300] if where else error.message[:300]
    for value in _numbers(arguments):  # JSON schema admits NaN and Infinity through Python's json
        if not math.isfinite(value):
            return "numbers must be finite"
    return None


def _numbers(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []
