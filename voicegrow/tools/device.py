"""A device's own tools (a xiaozhi board's MCP server) offered to the model for that device's turns.

The session driver keeps the device's MCP client on ``SessionInfo.device_tools`` (for xiaozhi:
:class:`voicegrow.streaming.device_mcp.DeviceMcpClient`); this adapter only needs its ``tools``
(name, description, input_schema) and ``call(name, arguments)`` returning ``text`` and ``is_error``,
so any device protocol that carries MCP can use it. The tools reach the model as ``device__<tool>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from voicegrow.tools.registry import ToolContext, ToolError, ToolSpec

__all__ = ["DeviceTools"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class DeviceTools:
    def __init__(self, client: Any, *, prefix: str = "device") -> None:
        self.client = client
        self.prefix = prefix

    def _names(self) -> dict[str, Any]:
        return {f"{self.prefix}__{_UNSAFE.sub('_', tool.name)}"[:64]: tool for tool in self.client.tools}

    def list_tools(self) -> Sequence[ToolSpec]:
        return [ToolSpec(name, (tool.description or tool.name)[:1000],
                         dict(tool.input_schema or {"type": "object", "properties": {}}))
                for name, tool in self._names().items()]

    async def call(self, name: str, arguments: dict[str, Any], context: ToolContext) -> Any:
        tool = self._names().get(name)
        if tool is None:
            raise ToolError(f"the device has no tool {name!r}")
        try:
            result = await self.client.call(tool.name, arguments)
        except Exception as exc:  # DeviceToolError: timeout, closed, error, bad_answer
            raise ToolError(f"the device could not run {tool.name}: {getattr(exc, 'message', exc)}"[:300]) from exc
        if result.is_error:
            raise ToolError(result.text[:500] or f"{tool.name} failed on the device")
        return result.text
