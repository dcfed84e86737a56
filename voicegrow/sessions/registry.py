"""The live-session registry: what ``GET /api/v1/sessions`` lists and what shutdown walks.

A session is added when its connection is accepted and removed only after its whole task tree has
exited, so an empty registry means no task of any session is left running.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import trio

__all__ = ["SessionInfo", "SessionRegistry"]


@dataclasses.dataclass
class SessionInfo:
    session_id: str
    remote_addr: str
    protocol: str = "detecting"
    device_id: str = ""
    since: float = dataclasses.field(default_factory=time.time)
    turns: int = 0
    #: ``wake``, ``always`` or ``push_to_talk`` (LISTEN_MODE), once the voice session runs.
    listen_mode: str = ""
    #: What the session is doing now (``listening``, ``hearing``, ``thinking``, ``speaking``); set by
    #: the voice session once the device is established, ``handshake`` before.
    state_of: Callable[[], str] | None = None
    #: Cancels the session's task tree; set by the connection handler.
    cancel_scope: trio.CancelScope | None = None
    #: Asks the session to say goodbye (close frame) before it is cancelled.
    request_close: Callable[[int, str], None] | None = None
    #: Speaks (text, language, data) on the device as a turn of its own; set once the voice session runs.
    announce: Callable[[str, str, dict[str, Any]], Awaitable[None]] | None = None
    #: The device's own tools (a :class:`~voicegrow.streaming.device_mcp.DeviceMcpClient`), for
    #: devices that serve MCP (xiaozhi boards); a tool registry offers them to the LLM.
    device_tools: Any = None
    #: Changes the listening mode of the running session (an operator's override, None: the
    #: settings' mode again); returns the mode now in force. Set while the voice session runs.
    set_listen_mode: Callable[[Any], Any] | None = None
    #: The barge-in policy the session resolved (``vad``, ``echo_safe``, ``wake_word``, ``off``).
    barge_in: str = ""

    #: The client's address without a port: the socket's peer, or the device behind a trusted proxy.
    remote_host: str = ""
    #: The trusted proxy the client came through (TRUSTED_PROXIES), None for a direct connection.
    via_proxy: str | None = None

    def __post_init__(self) -> None:
        if not self.remote_host:
            self.remote_host = self.remote_addr.rsplit(":", 1)[0]

    def public(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "device_id": self.device_id,
            "remote_addr": self.remote_addr,
            "via_proxy": self.via_proxy,
            "protocol": self.protocol,
            "since": self.since,
            "turns": self.turns,
            "listen_mode": self.listen_mode,
            "barge_in": self.barge_in,
            "state": self.state_of() if self.state_of is not None else "handshake",
            "device_tools": [tool.name for tool in self.device_tools.tools] if self.device_tools else [],
        }


class SessionRegistry:
    """Sessions by id, with a way to wait until all of them are gone."""

    def __init__(self) -> None:
        self._sessions: dict[str, SessionInfo] = {}
        self._changed = trio.Event()

    def add(self, info: SessionInfo) -> None:
        self._sessions[info.session_id] = info
        self._notify()

    def remove(self, session_id: str) -> None:
        if self._sessions.pop(session_id, None) is not None:
            self._notify()

    def get(self, session_id: str) -> SessionInfo | None:
        return self._sessions.get(session_id)

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[SessionInfo]:
        return iter(list(self._sessions.values()))

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    def announcer(self, device_id: str) -> Callable[[str, str, dict[str, Any]], Awaitable[None]] | None:
        """How to speak on ``device_id`` now (its newest session that can), or None if it is not here."""
        sessions = [s for s in self._sessions.values() if s.device_id == device_id and s.announce is not None]
        return max(sessions, key=lambda s: s.since).announce if sessions else None

    def count_by_protocol(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for info in self._sessions.values():
            counts[info.protocol] = counts.get(info.protocol, 0) + 1
        return counts

    def count_from(self, remote_host: str) -> int:
        return sum(1 for info in self._sessions.values() if info.remote_host == remote_host)

    async def wait_empty(self) -> None:
        while self._sessions:
            await self._changed.wait()

    async def wait_changed(self) -> None:
        """Until the next session is added or removed (the cluster view republishes then)."""
        await self._changed.wait()

    async def wait_until(self, predicate: Callable[["SessionRegistry"], bool]) -> None:
        while not predicate(self):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
