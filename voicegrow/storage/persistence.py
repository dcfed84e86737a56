"""The one object the server talks to about storage: records, audio, live state, and their health.

Layout: two spools under ``spool_dir`` (``mysql/`` for devices, sessions, turns and events; ``minio/``
for audio objects), each drained by its own :class:`~voicegrow.storage.writer.SpoolWriter` into its
backend (MySQL or SQLite; S3 or a local directory), so that one backend's outage never holds up the
other's writes. Redis (or its in-process stand-in) is called directly with a short timeout: what it
holds is short-lived and can be rebuilt, so when it is away history answers empty instead of waiting.

The write methods (``device_seen``, ``session_started``, ``session_ended``, ``record_event``,
``submit_turn``) return once the record is in the spool, never after a network round trip. If the spool
itself cannot be written (disk full), they log the loss, mark the component ``down`` and return: a
conversation must not fail because its recording could not be kept. Reads (the admin API) go to the
backends directly and see only what the writers have delivered so far.

A writer retries a backend that is away with backoff (``retry_initial_s`` doubling to ``retry_max_s``)
and removes a record only after the backend acknowledged it; every write is idempotent, so the replay
of a spool left by a crash or a restart (``run`` starts with it) writes each record exactly once in
effect. Embedded stand-ins (empty ``MYSQL_HOST``/``REDIS_HOST``/``MINIO_ENDPOINT``): SQLite in
``{DATA_DIR}/voicegrow.sqlite3``, an in-process dict, and ``{DATA_DIR}/audio/`` whose "presigned" URLs
are ``/api/v1/audio/<key>`` served by the admin API.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import trio

from voicegrow.audio import wav_bytes
from voicegrow.metrics import Metrics
from voicegrow.settings import Settings
from voicegrow.storage.blobs import BlobStore, LocalBlobs, S3Blobs
from voicegrow.storage.errors import BackendUnavailable, SpoolError, SpoolLockedError
from voicegrow.storage.health import ComponentHealth
from voicegrow.storage.mysql import MySQLStore
from voicegrow.storage.records import (
    TURN_OUTCOMES, Page, SessionRecord, TurnRecord, audio_keys, decode_cursor, device_prefix, encode_cursor,
)
from voicegrow.storage.spool import Spool, lock_directory
from voicegrow.storage.sqlite import SQLiteStore
from voicegrow.storage.sqlite_state import SQLiteState
from voicegrow.storage.sqlstore import SqlStore
from voicegrow.storage.state import MemoryState, RedisState, StateStore
from voicegrow.storage.writer import Acknowledgement, SpoolWriter

__all__ = ["Persistence", "COMPONENTS"]

log = logging.getLogger(__name__)

T = TypeVar("T")

COMPONENTS = ("mysql", "redis", "minio")


class Persistence:
    def __init__(self, *, records: SqlStore, state: StateStore, blobs: BlobStore, spool_dir: str | Path,
                 replica_id: str, session_ttl_s: int = 86400, metrics: Metrics | None = None,
                 retry_initial_s: float = 0.5, retry_max_s: float = 10.0, probe_interval_s: float = 5.0,
                 state_timeout_s: float = 0.5, startup_timeout_s: float = 10.0, delete_wait_s: float = 10.0,
                 max_attempts: int = 5, fsync: bool = True, orphan_spools: Sequence[Path] = ()) -> None:
        """``orphan_spools``: spool directories of worker indexes that no longer run (WORKERS was
        lowered); :meth:`run` delivers what they hold, then leaves them empty."""
        self.records = records
        self.state = state
        self.blobs = blobs
        self.replica_id = replica_id
        self.spool_dir = Path(spool_dir)
        self._session_ttl_s = session_ttl_s
        self._state_timeout_s = state_timeout_s
        self._startup_timeout_s = startup_timeout_s
        self._delete_wait_s = delete_wait_s
        self._running = False
        timing = dict(retry_initial_s=retry_initial_s, retry_max_s=retry_max_s,
                      probe_interval_s=probe_interval_s, max_attempts=max_attempts)
        self._probe_interval_s = probe_interval_s
        self._timing, self._fsync, self._orphan_spools = timing, fsync, list(orphan_spools)
        self._writers: dict[str, SpoolWriter] = {}
        for name, sink in (("mysql", records), ("minio", blobs)):
            spool = Spool(self.spool_dir / name, fsync=fsync)
            health = ComponentHealth(name, embedded=sink.embedded, backend=sink.describe(), metrics=metrics,
                                     spool_depth=spool.__len__, rejected=lambda spool=spool: spool.rejected_count)
            spool.on_change = health.depth_changed
            self._writers[name] = SpoolWriter(spool, sink, health, **timing)
        self._state_health = ComponentHealth("redis", embedded=state.embedded, backend=state.describe(),
                                             metrics=metrics)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None, *, key_prefix: str = "voicegrow:",
                      spool_dir: str | Path | None = None, connect_timeout_s: float = 3.0,
                      worker: int | None = None, **tuning: Any) -> Persistence:
        """Backends as the settings say; ``tuning`` passes the timing parameters of ``__init__``.

        ``worker``: this process is worker ``worker`` of several. A spool has one writer process, so
        worker 0 keeps ``{DATA_DIR}/spool`` (that of a single-process server) and worker k takes
        ``{DATA_DIR}/spool/worker-k`` (its replacement after a crash replays it). Without Redis, the live
        state goes to ``{DATA_DIR}/state.sqlite3``, which all workers share, instead of process memory.
        """
        data_dir = Path(settings.data_dir)
        orphans: list[Path] = []
        if spool_dir is None:
            spool_dir = data_dir / "spool" if not worker else data_dir / "spool" / f"worker-{worker}"
            if not worker:  # the first (or only) process adopts the spools of workers beyond WORKERS
                orphans = [p for p in (data_dir / "spool").glob("worker-*")
                           if p.name[7:].isdigit() and int(p.name[7:]) >= settings.workers]
        records: SqlStore
        if settings.mysql_host:
            records = MySQLStore(host=settings.mysql_host, port=settings.mysql_port, user=settings.mysql_user,
                                 password=settings.mysql_password, database=settings.mysql_database,
                                 connect_timeout_s=connect_timeout_s)
        else:
            records = SQLiteStore(data_dir / "voicegrow.sqlite3")
        state: StateStore
        if settings.redis_host:
            state = RedisState(host=settings.redis_host, port=settings.redis_port, password=settings.redis_password,
                               db=settings.redis_db, key_prefix=key_prefix,
                               socket_timeout_s=min(connect_timeout_s, 1.0))
        elif worker is not None:
            state = SQLiteState(data_dir / "state.sqlite3")
        else:
            state = MemoryState()
        blobs: BlobStore
        if settings.minio_endpoint:
            blobs = S3Blobs(endpoint=settings.minio_endpoint, access_key=settings.minio_access_key,
                            secret_key=settings.minio_secret_key, bucket=settings.minio_bucket,
                            secure=settings.minio_secure, presign_ttl_s=settings.presigned_url_ttl_s,
                            timeout_s=connect_timeout_s)
        else:
            blobs = LocalBlobs(data_dir / "audio")
        replica_id = settings.replica_id or socket.gethostname()
        if worker is not None:
            replica_id += f"/worker-{worker}"
        return cls(records=records, state=state, blobs=blobs, spool_dir=Path(spool_dir), replica_id=replica_id,
                   session_ttl_s=settings.session_ttl_s, metrics=metrics, orphan_spools=orphans, **tuning)

    # -- lifetime
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the spools, try each backend once (a backend that is down leaves its component degraded),
        report started, then deliver the spools (replaying what a previous run left) until cancelled."""
        lock = await trio.to_thread.run_sync(lock_directory, self.spool_dir)
        try:
            for writer in self._writers.values():
                await writer.spool.open()
            with trio.move_on_after(self._startup_timeout_s):
                async with trio.open_nursery() as first:
                    for writer in self._writers.values():
                        first.start_soon(writer.probe)
                    first.start_soon(self._probe_state)
            for health in self._healths():
                if not health.tried:
                    health.failed(f"no answer within {self._startup_timeout_s:g} s at start-up")
            async with trio.open_nursery() as nursery:
                for writer in self._writers.values():
                    nursery.start_soon(writer.run)
                nursery.start_soon(self._watch_state)
                for orphan in self._orphan_spools:
                    nursery.start_soon(self._deliver_orphan, orphan)
                self._running = True
                task_status.started()
        finally:
            self._running = False
            with trio.CancelScope(shield=True), trio.move_on_after(3):
                for closable in (self.records, self.blobs, self.state):
                    await closable.aclose()
            lock.close()

    async def _deliver_orphan(self, root: Path) -> None:
        """Deliver a spool that no running worker owns, then let it go (a live worker's is locked)."""
        try:
            lock = await trio.to_thread.run_sync(lock_directory, root)
        except SpoolLockedError:
            return
        try:
            for name, sink in (("mysql", self.records), ("minio", self.blobs)):
                spool = Spool(root / name, fsync=self._fsync)
                await spool.open()
                if not len(spool):
                    continue
                log.info("delivering %d %s records left by %s", len(spool), name, root.name)
                writer = SpoolWriter(spool, sink, self._writers[name].health, **self._timing)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(writer.run)
                    await spool.wait_empty()
                    nursery.cancel_scope.cancel()
        finally:
            lock.close()

    def _healths(self) -> list[ComponentHealth]:
        return [self._writers["mysql"].health, self._state_health, self._writers["minio"].health]

    async def wait_records_delivered(self) -> None:
        """Until the record spool is empty (the timer book loads its timers after that)."""
        await self._writers["mysql"].spool.wait_empty()

    async def wait_delivered(self) -> None:
        """Until both spools are empty (tests, and a graceful shutdown that wants to flush)."""
        for writer in self._writers.values():
            await writer.spool.wait_empty()

    # -- non-blocking writes
    async def _enqueue(self, component: str, header: dict[str, Any], payload: bytes = b"", *,
                       want_ack: bool = False) -> Acknowledgement | None:
        if not self._running:
            raise RuntimeError("Persistence.run() is not running (start it with nursery.start)")
        return await self._writers[component].enqueue(header, payload, want_ack=want_ack)

    async def _spool(self, component: str, header: dict[str, Any], payload: bytes = b"") -> None:
        try:
            await self._enqueue(component, header, payload)
        except SpoolError as exc:
            log.error("lost a %s record (%s): %s", component, header.get("op"), exc)

    async def device_seen(self, device_id: str, info: dict[str, Any]) -> None:
        await self._spool("mysql", {"op": "device_seen", "device_id": device_id, "info": info,
                                    "seen_at": time.time()})

    async def session_started(self, rec: SessionRecord) -> None:
        await self._spool("mysql", {"op": "session_started", "session": asdict(rec)})

    async def session_ended(self, session_id: str, ended_at: float, reason: str) -> None:
        await self._spool("mysql", {"op": "session_ended", "session_id": session_id, "ended_at": ended_at,
                                    "reason": reason})

    async def record_event(self, device_id: str, kind: str, data: dict[str, Any] | None = None, *,
                           session_id: str | None = None, at: float | None = None) -> None:
        await self._spool("mysql", {"op": "event", "event_id": uuid.uuid4().hex, "device_id": device_id,
                                    "session_id": session_id, "kind": kind, "at": at or time.time(),
                                    "data": data or {}})

    async def submit_turn(self, rec: TurnRecord, audio_in_pcm: bytes, in_rate: int, audio_out_pcm: bytes,
                          out_rate: int) -> None:
        """Spool the turn and its two recordings; fills ``rec.audio_in_key``/``audio_out_key`` (None for
        an empty recording)."""
        if rec.outcome not in TURN_OUTCOMES:
            raise ValueError(f"turn outcome {rec.outcome!r} is not one of {TURN_OUTCOMES}")
        in_key, out_key = audio_keys(rec)
        rec.audio_in_key = in_key if audio_in_pcm else None
        rec.audio_out_key = out_key if audio_out_pcm else None
        for key, pcm, rate in ((rec.audio_in_key, audio_in_pcm, in_rate), (rec.audio_out_key, audio_out_pcm, out_rate)):
            if key is not None:  # (a stray odd byte is dropped rather than losing the recording)
                await self._spool("minio", {"op": "put_object", "key": key, "content_type": "audio/wav"},
                                  wav_bytes(pcm[:len(pcm) - len(pcm) % 2], rate))
        await self._spool("mysql", {"op": "turn", "turn": rec.to_dict()})

    # -- timers (voicegrow.tools.timers.TimerStore)
    async def save_timer(self, row: dict[str, Any]) -> None:
        await self._spool("mysql", {"op": "timer", "timer": row})

    async def set_timer_state(self, timer_id: str, state: str, at: float) -> None:
        await self._spool("mysql", {"op": "timer_state", "timer_id": timer_id, "state": state, "at": at})

    async def claim_timer(self, timer_id: str, state: str, at: float) -> bool | None:
        """Directly, not spooled: whether this process moved the pending timer to ``state`` (see
        ``SqlStore.claim_timer``); raises BackendUnavailable when the store cannot answer."""
        return await (await self._records_ready()).claim_timer(timer_id, state, at)

    async def load_pending_timers(self) -> list[dict[str, Any]]:
        return await (await self._records_ready()).list_timers(None, ("pending",), limit=100_000)

    async def list_timers(self, device_id: str, *, limit: int = 200) -> list[dict[str, Any]]:
        return await (await self._records_ready()).list_timers(device_id, None, limit)

    # -- live state (Redis)
    async def _state_call(self, what: str, call: Callable[[], Awaitable[T]], default: T) -> T:
        start = trio.current_time()
        with trio.move_on_after(self._state_timeout_s):
            try:
                result = await call()
            except BackendUnavailable as exc:
                self._state_health.failed(str(exc))
                log.warning("redis %s failed: %s", what, exc)
                return default
            self._state_health.succeeded(trio.current_time() - start)
            return result
        self._state_health.failed(f"{what}: no answer within {self._state_timeout_s:g} s")
        log.warning("redis %s: no answer within %g s", what, self._state_timeout_s)
        return default

    async def _probe_state(self) -> None:
        await self._state_call("ping", self.state.ping, None)

    async def _watch_state(self) -> None:
        while True:
            await trio.sleep(self._probe_interval_s)
            await self._probe_state()

    async def load_history(self, device_id: str) -> list[dict[str, Any]]:
        return await self._state_call("load_history", lambda: self.state.load_history(device_id), [])

    async def save_history(self, device_id: str, messages: list[dict[str, Any]]) -> None:
        await self._state_call("save_history",
                               lambda: self.state.save_history(device_id, messages, self._session_ttl_s), None)

    async def claim_device(self, device_id: str, session_id: str) -> None:
        await self._state_call("claim_device", lambda: self.state.claim(
            device_id, session_id, self.replica_id, self._session_ttl_s), None)

    async def release_device(self, device_id: str, session_id: str) -> None:
        await self._state_call("release_device", lambda: self.state.release(device_id, session_id), False)

    async def live_session(self, device_id: str) -> dict[str, str] | None:
        """Which session (and replica) holds the device, or None (also when Redis is away)."""
        found = await self._state_call("live_session", lambda: self.state.live([device_id]), {})
        return found.get(device_id)

    # -- health
    def health(self) -> dict[str, dict[str, Any]]:
        return {h.name: h.report() for h in self._healths()}

    # -- reads (admin API); BackendUnavailable when the record store cannot answer
    async def _records_ready(self) -> SqlStore:
        await self.records.open()
        return self.records

    async def list_devices(self, *, limit: int = 50, cursor: str | None = None) -> Page:
        after = decode_cursor(cursor, (str,))[0] if cursor else None
        items, more = await (await self._records_ready()).list_devices(limit, after)
        ids = [item["device_id"] for item in items]
        live = await self._state_call("live", lambda: self.state.live(ids), {})
        for item in items:
            item["live"] = live.get(item["device_id"])
        return Page(items, encode_cursor((items[-1]["device_id"],)) if more else None)

    async def list_turns(self, device_id: str | None = None, since: float | None = None, limit: int = 50,
                         cursor: str | None = None, text: str | None = None) -> Page:
        """Newest first; ``text``: only turns whose transcript or reply contains it."""
        after = decode_cursor(cursor, (float, str)) if cursor else None
        items, more = await (await self._records_ready()).list_turns(device_id, since, limit, after, text)
        last = items[-1] if items else None
        return Page(items, encode_cursor((last["started_at"], last["turn_id"])) if more and last else None)

    async def get_turn(self, turn_id: str) -> dict[str, Any] | None:
        return await (await self._records_ready()).get_turn(turn_id)

    async def get_session(self, session_id: str) -> dict[str, Any] | None:
        return await (await self._records_ready()).get_session(session_id)

    async def listen_mode(self, device_id: str) -> str | None:
        """The device's listening mode set through the admin API, or None (BackendUnavailable)."""
        return await (await self._records_ready()).get_listen_mode(device_id)

    async def set_listen_mode(self, device_id: str, mode: str | None) -> bool:
        """Store (None: clear) the device's listening mode; False for a device never seen."""
        return await (await self._records_ready()).set_listen_mode(device_id, mode)

    async def delete_device_data(self, device_id: str) -> dict[str, Any]:
        """Erase a device's turns, sessions, events, timers, device row, audio objects and history.

        The deletions travel through the spools, behind any of the device's records still waiting
        there, so nothing spooled earlier can reappear after them. The counts come back if the backends
        answer within ``delete_wait_s``; otherwise the component is listed in ``pending`` and the
        deletion completes when it is back. ``failed`` lists what must be retried (Redis keeps no
        spool; its history expires with the TTL anyway). Raises SpoolError if the request itself could
        not be spooled.
        """
        record_ack = await self._enqueue("mysql", {"op": "delete_device", "device_id": device_id}, want_ack=True)
        audio_ack = await self._enqueue("minio", {"op": "delete_prefix", "prefix": device_prefix(device_id)},
                                        want_ack=True)
        history = await self._state_call("delete_device", lambda: self.state.delete_device(device_id), None)
        acks = {"mysql": record_ack, "minio": audio_ack}
        with trio.move_on_after(self._delete_wait_s):
            for ack in acks.values():
                assert ack is not None
                await ack.wait()
        report: dict[str, Any] = {"device_id": device_id, "turns": None, "sessions": None, "events": None,
                                  "timers": None, "devices": None, "audio_objects": None, "history_keys": history,
                                  "pending": [], "failed": [] if history is not None else ["redis"]}
        for name, ack in acks.items():
            assert ack is not None
            if not ack.done:
                report["pending"].append(name)
            elif ack.error is not None:
                report["failed"].append(name)
            else:
                report.update(ack.result or {})
        return report

    # -- audio
    def presigned_url(self, key: str | None) -> str | None:
        """A URL to fetch an audio object (S3: presigned, expiring; local: served by the admin API)."""
        return self.blobs.presigned_url(key) if key else None

    @property
    def audio_is_local(self) -> bool:
        return isinstance(self.blobs, LocalBlobs)

    async def read_audio(self, key: str) -> bytes | None:
        return await self.blobs.get(key)
