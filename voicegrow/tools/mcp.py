"""MCP servers as tool providers: ``MCP_SERVERS`` parsed, each server connected and its tools offered.

Uses the ``mcp`` SDK (it runs on anyio, so it runs on trio). Each server is one long-lived
connection held by its own task (``run``), reconnected with backoff when it drops; a server that
is down simply offers no tools meanwhile. Its tools reach the model as ``<server>__<tool>``, so two
servers never clash with each other or with the built-ins. A call is bounded by ``MCP_TIMEOUT_S``;
an error result, a timeout or a broken connection comes back to the model as a tool error.

``MCP_SERVERS`` syntax (docs in the README):

- JSON, the ``mcpServers`` shape other clients use:
  ``{"files": {"command": "python", "args": ["-m", "srv"], "env": {"K": "v"}},
  "web": {"url": "https://host/mcp", "headers": {"Authorization": "Bearer …"}}}``
  (the object may also be wrapped as ``{"mcpServers": {...}}``);
- compact, ``;``-separated ``name=command line`` (stdio, split like a shell would) or
  ``name=https://host/mcp`` (streamable HTTP): ``files=python -m srv; web=https://host/mcp``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
from collections.abc import Sequence
from typing import Any

import trio

from voicegrow.tools.registry import ToolContext, ToolError, ToolSpec

__all__ = ["McpConfigError", "McpServerConfig", "McpTools", "parse_mcp_servers"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
PING_INTERVAL_S = 30.0


class McpConfigError(ValueError):
    """``MCP_SERVERS`` cannot be understood; the message says where."""


@dataclasses.dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    url: str = ""
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def transport(self) -> str:
        return "http" if self.url else "stdio"


def parse_mcp_servers(text: str) -> list[McpServerConfig]:
    text = text.strip()
    if not text:
        return []
    servers = _parse_json(text) if text.startswith("{") else _parse_compact(text)
    names = [s.name for s in servers]
    if len(set(names)) != len(names):
        raise McpConfigError(f"server names must be unique: {names}")
    return servers


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise McpConfigError(f"server name {str(name)[:40]!r}: expected 1-32 characters of A-Z a-z 0-9 _ -")
    return name


def _check_url(name: str, url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise McpConfigError(f"server {name!r}: url must start with http:// or https://")
    return url


def _strings(name: str, field: str, value: object, kind: type) -> Any:
    if value is None:
        return ()
    if kind is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if kind is dict and isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in value.items()):
        return tuple(sorted(value.items()))
    raise McpConfigError(f"server {name!r}: {field} must be a {'list' if kind is tuple else 'map'} of strings")


def _parse_json(text: str) -> list[McpServerConfig]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise McpConfigError(f"not valid JSON ({exc})") from None
    if isinstance(data, dict) and set(data) == {"mcpServers"}:
        data = data["mcpServers"]
    if not isinstance(data, dict):
        raise McpConfigError("expected a JSON object of servers by name")
    servers = []
    for name, entry in data.items():
        _check_name(name)
        if not isinstance(entry, dict):
            raise McpConfigError(f"server {name!r}: expected an object with command or url")
        unknown = set(entry) - {"command", "args", "env", "url", "headers", "type", "transport"}
        if unknown:
            raise McpConfigError(f"server {name!r}: unknown keys {sorted(unknown)}")
        command, url = entry.get("command"), entry.get("url")
        if bool(command) == bool(url):
            raise McpConfigError(f"server {name!r}: give exactly one of command (stdio) or url (HTTP)")
        if url is not None and not isinstance(url, str) or command is not None and not isinstance(command, str):
            raise McpConfigError(f"server {name!r}: command and url must be strings")
        servers.append(McpServerConfig(
            name=name, command=command or "", args=_strings(name, "args", entry.get("args"), tuple),
            env=_strings(name, "env", entry.get("env"), dict), url=_check_url(name, url) if url else "",
            headers=_strings(name, "headers", entry.get("headers"), dict)))
    return servers


def _parse_compact(text: str) -> list[McpServerConfig]:
    servers = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, sep, target = part.partition("=")
        name, target = name.strip(), target.strip()
        if not sep or not target:
            raise McpConfigError(f"{part[:60]!r}: expected name=command or name=http(s)://url")
        _check_name(name)
        if target.startswith(("http://", "https://")):
            servers.append(McpServerConfig(name=name, url=target))
            continue
        try:
            words = shlex.split(target)
        except ValueError as exc:
            raise McpConfigError(f"server {name!r}: {exc}") from None
        servers.append(McpServerConfig(name=name, command=words[0], args=tuple(words[1:])))
    return servers


def exposed_name(server: str, tool: str) -> str:
    return f"{server}__{_UNSAFE.sub('_', tool)}"[:64]


class McpTools:
    """One MCP server's tools, over a connection that ``run`` keeps open."""

    def __init__(self, config: McpServerConfig, *, timeout_s: float, connect_timeout_s: float = 20.0) -> None:
        self.config = config
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.session: Any = None
        self._specs: list[ToolSpec] = []
        self._remote: dict[str, str] = {}
        self.connected = trio.Event()

    def list_tools(self) -> Sequence[ToolSpec]:
        return list(self._specs) if self.session is not None else []

    async def call(self, name: str, arguments: dict[str, Any], context: ToolContext) -> Any:
        session, remote = self.session, self._remote.get(name)
        if session is None or remote is None:
            raise ToolError(f"the {self.config.name} tool server is not connected")
        try:
            with trio.fail_after(self.timeout_s):
                result = await session.call_tool(remote, arguments)
        except trio.TooSlowError:
            raise ToolError(f"the {self.config.name} tool server did not answer within {self.timeout_s:g} s") from None
        except Exception as exc:
            log.warning("MCP %s: %s failed: %s", self.config.name, remote, exc)
            raise ToolError(f"the {self.config.name} tool server failed: {type(exc).__name__}") from exc
        text = "\n".join(getattr(part, "text", "") for part in result.content or () if getattr(part, "text", ""))
        if result.is_error:
            raise ToolError(text[:500] or f"{remote} failed")
        if not text and result.structured_content is not None:
            return result.structured_content
        return text

    async def run(self) -> None:
        """Connect, offer the tools, ping; on any failure forget the tools and reconnect later."""
        delay = 1.0
        while True:
            try:
                await self._serve_once()
                delay = 1.0
            except trio.Cancelled:
                raise
            except BaseException as exc:  # anyio wraps failures in exception groups
                if _cancelled(exc):
                    raise
                log.warning("MCP server %s (%s) unavailable: %s; retrying in %.0f s", self.config.name,
                            self.config.transport, _describe(exc), delay)
            finally:
                self.session, self._specs, self._remote = None, [], {}
            await trio.sleep(delay)
            delay = min(delay * 2, 60.0)

    async def _serve_once(self) -> None:
        from mcp.client.session import ClientSession

        async with self._transport() as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                with trio.fail_after(self.connect_timeout_s):
                    await session.initialize()
                    listing = await session.list_tools()
                specs, remote = [], {}
                for tool in listing.tools:
                    name = exposed_name(self.config.name, tool.name)
                    schema = getattr(tool, "input_schema", None) or {"type": "object", "properties": {}}
                    specs.append(ToolSpec(name, (tool.description or tool.name)[:1000], dict(schema),
                                          timeout_s=self.timeout_s))
                    remote[name] = tool.name
                self._specs, self._remote, self.session = specs, remote, session
                log.info("MCP server %s connected: %d tools", self.config.name, len(specs))
                self.connected.set()
                while True:
                    await trio.sleep(PING_INTERVAL_S)
                    with trio.fail_after(self.timeout_s):
                        await session.send_ping()

    def _transport(self) -> Any:
        config = self.config
        if config.url:
            from mcp.client.streamable_http import streamable_http_client
            from mcp.shared._httpx_utils import create_mcp_http_client

            client = create_mcp_http_client(headers=dict(config.headers)) if config.headers else None
            return streamable_http_client(config.url, http_client=client)
        from mcp.client.stdio import StdioServerParameters, stdio_client

        return stdio_client(StdioServerParameters(command=config.command, args=list(config.args),
                                                  env=dict(config.env) or None))


def _cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, (trio.Cancelled, KeyboardInterrupt))


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"[:300]
