"""Every replica's live sessions, through the Redis they share (``REDIS_HOST`` set).

Each server process is a *member* of the cluster. It keeps one key, ``{prefix}cluster:member:{id}``, a
JSON snapshot of its status and its sessions, rewritten at once (50 ms after a burst) when a session
comes or goes and every ``CLUSTER_HEARTBEAT_S`` in any case, with a TTL of three heartbeats: a replica
that dies (killed, its host gone) leaves the listing within that TTL, and one that stops cleanly deletes
its key on the way out. ``{prefix}cluster:members`` (a sorted set by last heartbeat) indexes the keys, so
a listing is two commands whatever the key space holds; the keys' TTL, kept by Redis itself, decides
who is alive, so clocks that differ between hosts do not matter.

Admin actions travel by pub/sub: each member subscribes to ``{prefix}cluster:control:{id}``; closing a
session held elsewhere publishes ``{"op": "close", "session_id": …}`` on the holder's channel, and the
holder closes it like a local close (goodbye frame first). ``PUBLISH`` answers how many subscribers got
the message, so a holder that is gone is not reported as closing.

The member id is the replica id (``REPLICA_ID``, host name by default, ``/worker-N`` under ``WORKERS``)
plus a random suffix per start: two processes given the same ``REPLICA_ID`` by mistake still list both.

Redis is reached with the ``redis`` package's blocking client in threads (short socket timeouts, no
retries), as the rest of the server does. Redis away: the listing falls back to this box and says
``"redis"`` is missing; the heartbeat and the subscription keep retrying.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.exceptions
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from voicegrow.sessions.view import LocalWorker, SessionView

__all__ = ["ClusterUnavailable", "ClusterView"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_BURST_S = 0.05  # sessions arriving together (a reconnect storm) cost one write
_SUBSCRIBE_WAIT_S = 2.0  # at start-up; a Redis that is away does not hold the server back
_MAX_RETRY_S = 5.0
_PRUNE_AFTER_S = 600.0  # index entries of members whose key expired long ago (any clock skew is less)


class ClusterUnavailable(Exception):
    """Redis did not answer (in time)."""


class ClusterView(SessionView):
    """This process's sessions directly, the box's workers through ``box``, every replica through Redis."""

    def __init__(self, local: LocalWorker, box: SessionView, client: redis.Redis, *, key_prefix: str,
                 replica_id: str, heartbeat_s: float, timeout_s: float = 2.0) -> None:
        super().__init__(local)
        self.box = box
        self.replica_id = replica_id
        self.member_id = f"{replica_id}#{uuid.uuid4().hex[:8]}"
        self.heartbeat_s = heartbeat_s
        self.ttl_ms = max(1000, int(heartbeat_s * 3000))
        self.timeout_s = timeout_s
        self._client = client
        self._members_key = f"{key_prefix}cluster:members"
        self._key_prefix = key_prefix
        self._limiter = trio.CapacityLimiter(4)
        self._subscribed = trio.Event()
        self._reachable = True

    @classmethod
    def from_settings(cls, settings: Any, local: LocalWorker, box: SessionView, *, replica_id: str) -> ClusterView:
        timeout_s = 2.0
        client = redis.Redis(host=settings.redis_host, port=settings.redis_port, db=settings.redis_db,
                             password=settings.redis_password or None, decode_responses=True,
                             socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                             retry=Retry(NoBackoff(), 0), health_check_interval=0)
        return cls(local, box, client, key_prefix=settings.redis_key_prefix, replica_id=replica_id,
                   heartbeat_s=settings.cluster_heartbeat_s, timeout_s=timeout_s)

    def _member_key(self, member_id: str) -> str:
        return f"{self._key_prefix}cluster:member:{member_id}"

    def _channel(self, member_id: str) -> str:
        return f"{self._key_prefix}cluster:control:{member_id}"

    # -- upkeep -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe and heartbeat until cancelled; then leave the cluster at once (key deleted)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._listen)
                with trio.move_on_after(_SUBSCRIBE_WAIT_S):
                    await self._subscribed.wait()
                await self._publish_once()
                nursery.start_soon(self._publish_forever)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.timeout_s):
                try:
                    await self._call(self._leave_blocking)
                except ClusterUnavailable as exc:
                    log.info("cluster: could not leave (the key expires by itself): %s", exc)
            self._client.close()

    async def _publish_forever(self) -> None:
        registry = self.local.services.registry
        while True:
            with trio.move_on_after(self.heartbeat_s):
                await registry.wait_changed()
                await trio.sleep(_BURST_S)
            await self._publish_once()

    async def _publish_once(self) -> None:
        snapshot = json.dumps({
            "member": self.member_id,
            "replica": self.replica_id,
            "at": time.time(),
            "status": self.local.status(),
            "sessions": self.local.sessions(),
        })
        try:
            await self._call(self._publish_blocking, snapshot)
        except ClusterUnavailable as exc:
            if self._reachable:
                log.warning("cluster: heartbeat failed (other replicas stop listing these sessions): %s", exc)
            self._reachable = False
            return
        if not self._reachable:
            log.info("cluster: heartbeat restored")
        self._reachable = True

    def _publish_blocking(self, snapshot: str) -> None:
        now = time.time()
        pipe = self._client.pipeline(transaction=True)
        pipe.set(self._member_key(self.member_id), snapshot, px=self.ttl_ms)
        pipe.zadd(self._members_key, {self.member_id: now})
        pipe.zremrangebyscore(self._members_key, "-inf", now - _PRUNE_AFTER_S)
        pipe.execute()

    def _leave_blocking(self) -> None:
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._member_key(self.member_id))
        pipe.zrem(self._members_key, self.member_id)
        pipe.execute()

    async def _listen(self) -> None:
        stop = threading.Event()
        try:
            await trio.to_thread.run_sync(self._listen_blocking, trio.lowlevel.current_trio_token(), stop,
                                          abandon_on_cancel=True, limiter=trio.CapacityLimiter(1))
        finally:
            stop.set()  # the abandoned thread sees it within one poll

    def _listen_blocking(self, token: trio.lowlevel.TrioToken, stop: threading.Event) -> None:
        """The subscriber thread: our channel's messages into trio, resubscribing after an outage."""
        backoff = 0.1
        while not stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._channel(self.member_id))
                trio.from_thread.run_sync(self._subscribed.set, trio_token=token)
                backoff = 0.1
                while not stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        trio.from_thread.run_sync(self._on_message, message["data"], trio_token=token)
            except (redis.exceptions.RedisError, OSError) as exc:
                log.debug("cluster: subscription lost: %s: %s", type(exc).__name__, exc)
                stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_RETRY_S)
            except trio.RunFinishedError:
                return
            finally:
                pubsub.close()

    def _on_message(self, data: str) -> None:
        try:
            message = json.loads(data)
        except ValueError:
            message = None
        if (isinstance(message, dict) and message.get("op") == "listen_mode"
                and isinstance(message.get("device_id"), str)
                and message.get("mode") in (None, "wake", "always", "push_to_talk")):
            applied = self.local.set_listen_mode(message["device_id"], message["mode"])
            log.info("cluster: %s set the listening mode of %s to %s (%d sessions here)", message.get("from", "?"),
                     message["device_id"], message["mode"] or "the settings'", len(applied))
            return
        if not isinstance(message, dict) or message.get("op") != "close" or not isinstance(
                message.get("session_id"), str):
            log.warning("cluster: ignored a control message: %.80r", data)
            return
        closed = self.local.close_session(message["session_id"])
        log.info("cluster: %s asked to close session %s%s", message.get("from", "?"), message["session_id"],
                 "" if closed else " (already gone)")

    # -- the view -----------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        with trio.move_on_after(self.timeout_s):
            try:
                return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)
            except (redis.exceptions.RedisError, OSError) as exc:
                raise ClusterUnavailable(f"{type(exc).__name__}: {exc}") from exc
        raise ClusterUnavailable(f"no answer within {self.timeout_s:g} s")

    def _members_blocking(self) -> list[dict[str, Any]]:
        ids = self._client.zrange(self._members_key, 0, -1)
        if not ids:
            return []
        members = []
        for raw in self._client.mget([self._member_key(i) for i in ids]):
            if raw:  # None: the member's key expired (it died) or it left
                try:
                    member = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(member, dict) and isinstance(member.get("sessions"), list):
                    members.append(member)
        return members

    async def members(self) -> list[dict[str, Any]]:
        """Every live member's last snapshot (this process's included); raises ClusterUnavailable."""
        return await self._call(self._members_blocking)

    async def sessions(self) -> tuple[list[dict[str, Any]], list[int | str]]:
        try:
            members = await self.members()
        except ClusterUnavailable as exc:
            log.warning("cluster: listing this box only: %s", exc)
            items, missing = await self.box.sessions()
            return [{**s, "replica": self.replica_id} for s in items], [*missing, "redis"]
        items = [{**s, "replica": self.replica_id} for s in self.local.sessions()]  # ours as of now
        for member in members:
            if member.get("member") != self.member_id:
                replica = member.get("replica", "")
                items.extend({**s, "replica": replica} for s in member["sessions"] if isinstance(s, dict))
        return items, []

    async def workers(self) -> list[dict[str, Any]]:
        return await self.box.workers()

    async def close_session(self, session_id: str) -> bool:
        if await self.box.close_session(session_id):
            return True
        try:
            members = await self.members()
            holders = [m["member"] for m in members if m.get("member") != self.member_id and any(
                isinstance(s, dict) and s.get("session_id") == session_id for s in m["sessions"])]
            message = json.dumps({"op": "close", "session_id": session_id, "from": self.member_id})
            for holder in holders:
                if await self._call(self._client.publish, self._channel(holder), message):
                    return True
        except ClusterUnavailable as exc:
            log.warning("cluster: cannot reach other replicas to close %s: %s", session_id, exc)
        return False

    async def set_listen_mode(self, device_id: str, mode: str | None) -> list[dict[str, Any]]:
        """This box's sessions of the device directly; the other replicas holding one (by their last
        snapshot) are told over their channel, and their sessions are listed as they were seen."""
        applied = [{**a, "replica": self.replica_id} for a in await self.box.set_listen_mode(device_id, mode)]
        try:
            members = await self.members()
            message = json.dumps({"op": "listen_mode", "device_id": device_id, "mode": mode, "from": self.member_id})
            for member in members:
                if member.get("member") == self.member_id:
                    continue
                held = [s for s in member["sessions"] if isinstance(s, dict) and s.get("device_id") == device_id]
                if held and await self._call(self._client.publish, self._channel(member["member"]), message):
                    applied.extend({"session_id": s.get("session_id"), "listen_mode": mode or "",
                                    "replica": member.get("replica", "")} for s in held)
        except ClusterUnavailable as exc:
            log.warning("cluster: cannot reach other replicas to set the listening mode of %s: %s", device_id, exc)
        return applied
