"""Drains one spool into one backend, in order, retrying with backoff while the backend is away.

One writer per backend, each in its own task, so that a slow or absent object store never delays
database writes. The writer also probes its backend when there is nothing to write, so that the health
report notices an outage (and a recovery) without waiting for traffic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import trio

from voicegrow.storage.errors import BackendUnavailable, CorruptSpoolRecord, SpoolError, StorageError
from voicegrow.storage.health import ComponentHealth
from voicegrow.storage.spool import Spool

__all__ = ["Sink", "SpoolWriter", "Acknowledgement"]

log = logging.getLogger(__name__)


class Sink(Protocol):
    async def open(self) -> None: ...
    async def ping(self) -> None: ...
    async def apply(self, op: Mapping[str, Any], payload: bytes = b"") -> dict[str, int] | None: ...


class Acknowledgement:
    """Settled when the writer has applied (or set aside) one record; for callers that need the result."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self.result: dict[str, int] | None = None
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def settle(self, result: dict[str, int] | None, error: str | None) -> None:
        self.result, self.error = result, error
        self._done.set()

    async def wait(self) -> None:
        await self._done.wait()


class SpoolWriter:
    def __init__(self, spool: Spool, sink: Sink, health: ComponentHealth, *, retry_initial_s: float = 0.5,
                 retry_max_s: float = 10.0, probe_interval_s: float = 5.0, max_attempts: int = 5) -> None:
        self.spool = spool
        self.sink = sink
        self.health = health
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._probe_interval_s = probe_interval_s
        self._max_attempts = max_attempts
        self._attempts: dict[int, int] = {}
        self._acks: dict[int, Acknowledgement] = {}

    async def enqueue(self, header: dict[str, Any], payload: bytes = b"", *,
                      want_ack: bool = False) -> Acknowledgement | None:
        """Append durably; raises SpoolError (and marks the component down) if the disk refuses."""
        try:
            seq = await self.spool.append(header, payload)
        except SpoolError as exc:
            self.health.spool_failed(str(exc))
            raise
        self.health.spooled()
        if not want_ack:
            return None
        ack = self._acks[seq] = Acknowledgement()  # no checkpoint since append: the writer cannot be ahead
        return ack

    async def probe(self) -> None:
        """One connection attempt (schema migrations included) that updates the health report."""
        start = trio.current_time()
        try:
            await self.sink.open()
            await self.sink.ping()
        except StorageError as exc:
            self.health.failed(str(exc))
        else:
            self.health.succeeded(trio.current_time() - start)

    async def run(self) -> None:
        backoff = self._retry_initial_s
        while True:
            seq = self.spool.head()
            if seq is None:
                with trio.move_on_after(self._probe_interval_s):
                    await self.spool.wait_nonempty()
                if self.spool.head() is None:
                    await self.probe()
                continue
            if await self._deliver(seq):
                backoff = self._retry_initial_s
            else:
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self._retry_max_s)

    async def _deliver(self, seq: int) -> bool:
        """Try the head record once; False when the writer should back off before the next try."""
        try:
            header, payload = await self.spool.read(seq)
        except CorruptSpoolRecord as exc:
            await self._set_aside(seq, f"corrupt: {exc}")
            return True
        except SpoolError as exc:
            self.health.spool_failed(str(exc))
            return False
        start = trio.current_time()
        try:
            await self.sink.open()
            result = await self.sink.apply(header, payload)
        except StorageError as exc:
            if isinstance(exc, BackendUnavailable) or exc.code == "migration_failed":
                self.health.failed(str(exc))
                return False
            return await self._refused(seq, header, exc)
        except Exception as exc:  # a bug applying this record must not stop the records behind it
            log.exception("%s: applying spool record %d (%s) failed", self.health.name, seq, header.get("op"))
            return await self._refused(seq, header, exc)
        self._attempts.pop(seq, None)
        try:
            await self.spool.remove(seq)
        except SpoolError as exc:
            self.health.spool_failed(str(exc))
        self.health.succeeded(trio.current_time() - start)
        self._settle(seq, result, None)
        return True

    async def _refused(self, seq: int, header: Mapping[str, Any], exc: Exception) -> bool:
        attempts = self._attempts[seq] = self._attempts.get(seq, 0) + 1
        log.warning("%s: spool record %d (%s) refused, attempt %d of %d: %s", self.health.name, seq,
                    header.get("op"), attempts, self._max_attempts, exc)
        if attempts < self._max_attempts:
            return False
        await self._set_aside(seq, f"{type(exc).__name__}: {exc}")
        return True

    async def _set_aside(self, seq: int, reason: str) -> None:
        self._attempts.pop(seq, None)
        try:
            where = await self.spool.quarantine(seq, reason)
        except SpoolError as exc:
            self.health.spool_failed(str(exc))
            where = None
        log.error("%s: spool record %d set aside in %s: %s", self.health.name, seq, where, reason)
        self._settle(seq, None, reason)

    def _settle(self, seq: int, result: dict[str, int] | None, error: str | None) -> None:
        ack = self._acks.pop(seq, None)
        if ack is not None:
            ack.settle(result, error)
