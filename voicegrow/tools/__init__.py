"""Tools the language model can call: the registry, the built-ins, timers and alarms, MCP servers.

The interface for anyone adding tools (a device's own MCP tools, say) is small: a provider has
``list_tools() -> [ToolSpec]`` and ``async call(name, arguments, context)`` returning text or a
JSON-able object, or raising :class:`ToolError` with a message for the model; add it with
:meth:`ToolRegistry.add`. Arguments arrive already checked against the spec's JSON schema. A
provider with a lifetime also has ``async run()``, started with the server.
"""

from __future__ import annotations

from voicegrow.tools.registry import ToolContext, ToolError, ToolOutcome, ToolProvider, ToolRegistry, ToolSpec

__all__ = ["ToolContext", "ToolError", "ToolOutcome", "ToolProvider", "ToolRegistry", "ToolSpec"]
