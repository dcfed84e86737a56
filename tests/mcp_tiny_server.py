"""A tiny stdio MCP server for the tests: ``python tests/mcp_tiny_server.py``.

Tools: ``add`` (two integers), ``fail`` (always an error result), ``slow`` (sleeps ``seconds``).
"""

from __future__ import annotations

import time

from mcp.server.mcpserver import MCPServer

app = MCPServer("voicegrow-tests")


@app.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return f"{a} plus {b} is {a + b}"


@app.tool()
def fail() -> str:
    """Always fails."""
    raise RuntimeError("the tiny server refuses")


@app.tool()
def slow(seconds: float) -> str:
    """Answers after a while."""
    time.sleep(seconds)
    return "finally"


if __name__ == "__main__":
    app.run()
