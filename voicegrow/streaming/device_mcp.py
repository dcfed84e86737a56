"""The MCP client side of a device's own tools: the server calls, the device (an ESP32) serves.

A xiaozhi board is an MCP server behind its WebSocket session (``type: "mcp"`` messages carrying
JSON-RPC 2.0, docs/xiaozhi.md): ``initialize``, then ``tools/list`` (paged by ``nextCursor``), then
``tools/call``. This class is what a tool registry needs from such a device — the tool list and a
``call`` that either returns the device's result or raises :class:`DeviceToolError` within a
deadline — and it knows nothing of the wire beyond the codec's JSON-RPC helpers, so another device
protocol carrying MCP can reuse it by giving it a different ``send``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from voicegrow import __version__
from voicegrow.protocol import xiaozhi as wire

__all__ = ["DeviceMcpClient", "DeviceTool", "DeviceToolError", "ToolResult"]

log = logging.getLogger(__name__)

#: ``tools/list`` pages followed before giving up (a device that never stops paging is broken).
MAX_PAGES = 16
#: The MCP revision the firmware answers ``initialize`` with (``mcp_server.cc``).
PROTOCOL_VERSION = "2024-11-05"


class DeviceToolError(Exception):
    """A device call failed: ``reason`` is ``timeout``, ``error`` (JSON-RPC error), ``closed`` or ``bad_answer``."""

    def __init__(self, reason: str, message: str, code: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.code = code


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceTool:
    """One tool as ``tools/list`` describes it; ``input_schema`` is its JSON Schema for arguments."""

    name: str
    description: str
    input_schema: Mapping[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class ToolResult:
    """``tools/call``'s result: the text parts of ``content`` joined, and the device's ``isError``."""

    text: str
    is_error: bool
    raw: Mapping[str, Any]


class _Pending:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: wire.McpResult | None = None


Send = Callable[[wire.Mcp], Awaitable[None]]


class DeviceMcpClient:
    """JSON-RPC calls to one device, matched by id, each bounded by ``timeout_s``.

    The driver feeds every ``mcp`` payload from the device to :meth:`on_payload`; :meth:`close`
    (the session ended) fails every waiting call at once.
    """

    def __init__(self, send: Send, *, timeout_s: float = 5.0, session_id: str = "") -> None:
        self._send = send
        self.timeout_s = timeout_s
        self._session_id = session_id
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._closed = False
        self.tools: list[DeviceTool] = []
        self.server_info: Mapping[str, Any] = {}
        self.ready = trio.Event()  # set once the tool list is known (possibly empty)

    # -- the registry-facing interface

    async def start(self) -> list[DeviceTool]:
        """``initialize`` then every ``tools/list`` page; sets :attr:`tools` and :attr:`ready`."""
        try:
            init = await self.request("initialize", {
                "protocolVersion": PROTOCOL_VERSION, "capabilities": {},
                "clientInfo": {"name": "voicegrow", "version": __version__}})
            info = init.get("serverInfo")
            self.server_info = info if isinstance(info, dict) else {}
            tools: list[DeviceTool] = []
            cursor = ""
            for _ in range(MAX_PAGES):
                page = await self.request("tools/list", {"cursor": cursor})
                tools.extend(_parse_tools(page.get("tools")))
                cursor = page.get("nextCursor") or ""
                if not isinstance(cursor, str) or not cursor:
                    break
            self.tools = tools
            return tools
        finally:
            self.ready.set()

    async def call(self, name: str, arguments: Mapping[str, Any] | None = None, *,
                   timeout_s: float | None = None) -> ToolResult:
        """Run one of the device's tools; raises :class:`DeviceToolError` if it fails or does not answer."""
        result = await self.request("tools/call", {"name": name, "arguments": dict(arguments or {})},
                                    timeout_s=timeout_s)
        content = result.get("content")
        texts = [part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"] \
            if isinstance(content, list) else []
        return ToolResult(text="".join(t for t in texts if isinstance(t, str)),
                          is_error=result.get("isError") is True, raw=result)

    # -- JSON-RPC

    async def request(self, method: str, params: Mapping[str, Any], *,
                      timeout_s: float | None = None) -> Mapping[str, Any]:
        """Send a request and wait for its ``result`` (raises :class:`DeviceToolError`)."""
        if self._closed:
            raise DeviceToolError("closed", "the device session has ended")
        self._next_id += 1
        call_id = self._next_id
        pending = self._pending[call_id] = _Pending()
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            await self._send(wire.mcp_call(call_id, method, params, session_id=self._session_id))
            with trio.move_on_after(timeout):
                await pending.done.wait()
        finally:
            self._pending.pop(call_id, None)
        answer = pending.result
        if answer is None:
            if self._closed:
                raise DeviceToolError("closed", f"{method}: the device session ended")
            raise DeviceToolError("timeout", f"{method}: no answer within {timeout:g} s")
        if not answer.ok:
            raise DeviceToolError("error", f"{method}: {answer.error_message[:200]}", answer.error_code)
        assert answer.result is not None
        return answer.result

    def on_payload(self, payload: Mapping[str, Any]) -> bool:
        """A JSON-RPC payload from the device; False when it answers nothing we wait for.

        Raises :class:`~voicegrow.protocol.xiaozhi.XiaozhiError` for a payload that is not JSON-RPC.
        """
        answer = wire.parse_mcp_result(payload)
        if answer is None:
            log.debug("device MCP notification %s", payload.get("method"))
            return False
        pending = self._pending.get(answer.id) if isinstance(answer.id, int) else None
        if pending is None:
            return False
        pending.result = answer
        pending.done.set()
        return True

    def close(self) -> None:
        self._closed = True
        for pending in self._pending.values():
            pending.done.set()


def _parse_tools(value: Any) -> list[DeviceTool]:
    if not isinstance(value, list):
        raise DeviceToolError("bad_answer", "tools/list without a 'tools' list")
    tools = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            log.info("ignoring a malformed device tool: %r", str(item)[:120])
            continue
        schema = item.get("inputSchema")
        description = item.get("description")
        tools.append(DeviceTool(name=item["name"], description=description if isinstance(description, str) else "",
                                input_schema=schema if isinstance(schema, dict) else {"type": "object"}))
    return tools
