"""The one writer of a connection: a bounded queue in front of the WebSocket.

Every task of a session that wants to talk to the device puts a message here; a single writer task
sends them in order. The bound is the backpressure: a device that stops reading fills the queue, the
producers wait, and if the queue stays full for ``slow_reader_timeout_s`` the session is closed rather
than letting memory grow. The outbox only reports the stall (:attr:`Outbox.stalled`); its owner
watches for it and ends the session. It keeps no reference to its owner: a callback into the session
would tie the two in a reference cycle, and a session in a cycle outlives its connection until the
cycle collector's next full pass, hours later in a process holding a big model. Reply audio is tagged with its turn so that, after a barge-in, audio of the
interrupted turn still sitting in the queue is dropped instead of reaching the speaker.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable

import trio

__all__ = ["Outbox", "SlowReader"]


class SlowReader(Exception):
    """The device did not read what we sent for longer than the configured time."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Item:
    message: bytes | str
    audio_turn: int | None  # set for droppable reply audio


class Outbox:
    def __init__(self, send: Callable[[bytes | str], Awaitable[None]], *, size: int,
                 slow_reader_timeout_s: float, wait_when_stalled: bool = False) -> None:
        """When the queue stayed full too long, :attr:`stalled` is set and the stalled producer raises
        :class:`SlowReader`, or, with ``wait_when_stalled``, waits to be cancelled by the owner
        watching :attr:`stalled`."""
        self._send = send
        self._wait_when_stalled = wait_when_stalled
        self.stalled = trio.Event()
        self._tx, self._rx = trio.open_memory_channel[_Item](size)
        self._slow_reader_timeout_s = slow_reader_timeout_s
        self._dropped_through = -math.inf  # audio of turns <= this id is dropped
        self.sent_messages = 0
        self.dropped_audio = 0
        self._accepted = 0  # messages put into the queue
        self._finished = 0  # messages sent or dropped by the writer
        self._progress = trio.Event()

    async def put(self, message: bytes | str) -> None:
        await self._put(_Item(message, None))

    async def put_audio(self, message: bytes | str, turn_id: int) -> None:
        if turn_id <= self._dropped_through:
            self.dropped_audio += 1
            return
        await self._put(_Item(message, turn_id))

    def drop_audio_through(self, turn_id: int) -> None:
        """Discard queued and future audio of ``turn_id`` and every older turn."""
        self._dropped_through = max(self._dropped_through, turn_id)

    def put_nowait(self, message: bytes | str) -> bool:
        """Queue without waiting (for goodbyes during shutdown); False when the queue is full."""
        try:
            self._tx.send_nowait(_Item(message, None))
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        self._accepted += 1
        return True

    async def _put(self, item: _Item) -> None:
        try:
            self._tx.send_nowait(item)
            self._accepted += 1
            return
        except trio.WouldBlock:
            pass
        with trio.move_on_after(self._slow_reader_timeout_s):
            await self._tx.send(item)
            self._accepted += 1
            return
        self.stalled.set()
        if not self._wait_when_stalled:
            raise SlowReader(f"write queue full for {self._slow_reader_timeout_s:g} s")
        await trio.sleep_forever()  # the owner cancels the session around us

    async def drain(self) -> None:
        """Wait until everything queued so far has been written to the socket (or dropped)."""
        target = self._accepted
        while self._finished < target:
            await self._progress.wait()

    async def run(self) -> None:
        """The writer task: send queued messages in order until cancelled or the socket fails."""
        async for item in self._rx:
            if item.audio_turn is not None and item.audio_turn <= self._dropped_through:
                self.dropped_audio += 1
            else:
                await self._send(item.message)
                self.sent_messages += 1
            self._finished += 1
            self._progress.set()
            self._progress = trio.Event()
