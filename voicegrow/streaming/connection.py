"""The socket side every session driver shares: one writer, slow-reader handling, and closing.

A driver (native, open-xiaoai) runs its reader and voice session inside :meth:`DeviceConnection.running`;
this object owns the writer task and the ways a session ends: the device stops reading (closed 1008
once the write queue stayed full), the driver closes it, or the server asks it to leave (shutdown, a
newer connection of the same speaker) from outside the session's task tree.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from voicegrow.services import Services
from voicegrow.streaming.outbox import Outbox
from voicegrow.sessions.registry import SessionInfo

__all__ = ["DeviceConnection"]

log = logging.getLogger(__name__)

#: Builds the protocol's own goodbye message (a CLOSE frame), or None where the protocol has none.
Goodbye = Callable[[int, str], bytes | str | None]


class DeviceConnection:
    def __init__(self, services: Services, ws: WebSocketConnection, *, goodbye: Goodbye | None = None) -> None:
        settings = services.settings
        self.services = services
        self.ws = ws
        self.outbox = Outbox(ws.send_message, size=settings.write_queue_frames,
                             slow_reader_timeout_s=settings.slow_reader_timeout_s, wait_when_stalled=True)
        self._goodbye = goodbye
        self._nursery: trio.Nursery | None = None
        self.closing = False
        self._stalled = False
        self._close_request: tuple[int, str] | None = None
        self._close_asked = trio.Event()

    @contextlib.asynccontextmanager
    async def running(self, info: SessionInfo) -> AsyncIterator[trio.Nursery]:
        """The session's nursery, with the writer and the closer running; cancelled when the body ends."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            info.request_close = self.request_close
            nursery.start_soon(self._writer)
            nursery.start_soon(self._close_when_asked)
            nursery.start_soon(self._end_when_stalled)
            yield nursery
            nursery.cancel_scope.cancel()
        if self._stalled:
            with trio.move_on_after(1.0):
                await self.ws.aclose(1008, "slow reader: write queue full")

    def end(self) -> None:
        """End the session's tasks now (the peer is gone, or the driver is done)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def close(self, code: int, reason: str) -> None:
        """Send what is queued, close the WebSocket with ``code``, end the session's tasks."""
        if not self.closing:
            self.closing = True
            with trio.move_on_after(2.0):
                try:
                    await self.outbox.drain()
                    await self.ws.aclose(code, reason[:120])
                except ConnectionClosed:
                    pass
        self.end()

    def request_close(self, code: int, reason: str) -> None:
        """Asked from outside the session's task tree, maybe while it is ending: only note the wish."""
        if self._close_request is None:
            self._close_request = (code, reason)
            self._close_asked.set()

    async def _close_when_asked(self) -> None:
        await self._close_asked.wait()
        assert self._close_request is not None
        code, reason = self._close_request
        if self._goodbye is not None and not self.closing:
            message = self._goodbye(code, reason)
            if message is not None:
                self.outbox.put_nowait(message)
        await self.close(code, reason)

    async def _writer(self) -> None:
        try:
            await self.outbox.run()
        except ConnectionClosed:
            self.end()

    async def _end_when_stalled(self) -> None:
        """The device stopped reading: end the session rather than buffer without bound."""
        await self.outbox.stalled.wait()
        log.warning("closing slow reader: write queue full for %.0f s", self.services.settings.slow_reader_timeout_s)
        self.services.metrics.limit_hits.labels("slow_reader").inc()
        self._stalled = True
        self.end()
