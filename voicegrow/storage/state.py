"""Short-lived per-device state: which session (on which replica) holds a device, and recent history.

Two implementations with one async interface: :class:`RedisState` (the ``redis`` package's sync client
in worker threads through a limiter, short socket timeouts, no client-side retries: the caller decides
how long to wait) and :class:`MemoryState` (a dict with expiry times, when ``REDIS_HOST`` is empty).
Keys are ``{prefix}history:{device}`` (a JSON list, TTL) and ``{prefix}live:{device}`` (a hash with
``session_id``, ``replica_id`` and ``claimed_at``, TTL); the prefix lets tests and deployments share a
Redis without seeing each other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
import redis.exceptions
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from voicegrow.storage.errors import BackendUnavailable

__all__ = ["RedisState", "MemoryState", "StateStore"]

T = TypeVar("T")

# Delete the live-session hash only if it still names the session that releases it: a device that
# reconnected elsewhere in the meantime must keep its new claim.
_RELEASE_IF_OWNER = """
if redis.call('HGET', KEYS[1], 'session_id') == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class StateStore:
    """The interface both implementations offer (all methods may raise BackendUnavailable)."""

    component = "redis"
    embedded = False

    async def ping(self) -> None: ...
    async def load_history(self, device_id: str) -> list[dict[str, Any]]: ...
    async def save_history(self, device_id: str, messages: list[dict[str, Any]], ttl_s: int) -> None: ...
    async def claim(self, device_id: str, session_id: str, replica_id: str, ttl_s: int) -> None: ...
    async def release(self, device_id: str, session_id: str) -> bool: ...
    async def live(self, device_ids: list[str]) -> dict[str, dict[str, str]]: ...
    async def delete_device(self, device_id: str) -> int: ...
    async def aclose(self) -> None: ...
    def describe(self) -> str: ...


def _decode_history(raw: str | bytes | None) -> list[dict[str, Any]]:
    if not raw:
        return []
    value = json.loads(raw)
    return value if isinstance(value, list) else []


class RedisState(StateStore):
    def __init__(self, *, host: str, port: int = 6379, password: str = "", db: int = 0,
                 key_prefix: str = "voicegrow:", socket_timeout_s: float = 1.0, max_threads: int = 4) -> None:
        self._host, self._port, self._db = host, port, db
        self.key_prefix = key_prefix
        self._client = redis.Redis(
            host=host, port=port, db=db, password=password or None, decode_responses=True,
            socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._release_script = self._client.register_script(_RELEASE_IF_OWNER)
        self._limiter = trio.CapacityLimiter(max_threads)

    def describe(self) -> str:
        return f"redis {self._host}:{self._port}/{self._db}"

    def _key(self, kind: str, device_id: str) -> str:
        return f"{self.key_prefix}{kind}:{device_id}"

    async def _call(self, fn: Callable[[], T]) -> T:
        # abandon_on_cancel: a caller's timeout returns at once; the thread ends by its socket timeout.
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter, abandon_on_cancel=True)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            raise BackendUnavailable(f"Redis unreachable: {exc}") from exc
        except redis.exceptions.RedisError as exc:  # BUSY, LOADING, READONLY, NOAUTH …
            raise BackendUnavailable(f"Redis refused: {exc}") from exc

    async def ping(self) -> None:
        await self._call(self._client.ping)

    async def load_history(self, device_id: str) -> list[dict[str, Any]]:
        return _decode_history(await self._call(lambda: self._client.get(self._key("history", device_id))))

    async def save_history(self, device_id: str, messages: list[dict[str, Any]], ttl_s: int) -> None:
        text = json.dumps(messages, ensure_ascii=False)
        await self._call(lambda: self._client.set(self._key("history", device_id), text, ex=ttl_s))

    async def claim(self, device_id: str, session_id: str, replica_id: str, ttl_s: int) -> None:
        key = self._key("live", device_id)
        mapping = {"session_id": session_id, "replica_id": replica_id, "claimed_at": repr(time.time())}

        def run() -> None:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(key)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, ttl_s)
            pipe.execute()

        await self._call(run)

    async def release(self, device_id: str, session_id: str) -> bool:
        key = self._key("live", device_id)
        return bool(await self._call(lambda: self._release_script(keys=[key], args=[session_id])))

    async def live(self, device_ids: list[str]) -> dict[str, dict[str, str]]:
        def run() -> list[dict[str, str]]:
            pipe = self._client.pipeline(transaction=False)
            for device_id in device_ids:
                pipe.hgetall(self._key("live", device_id))
            return pipe.execute()

        found = await self._call(run) if device_ids else []
        return {d: h for d, h in zip(device_ids, found) if h}

    async def delete_device(self, device_id: str) -> int:
        """Drop the device's conversation history (its live-session pointer is not personal data)."""
        return int(await self._call(lambda: self._client.delete(self._key("history", device_id))))

    async def aclose(self) -> None:
        await trio.to_thread.run_sync(self._client.close, limiter=self._limiter, abandon_on_cancel=True)


class MemoryState(StateStore):
    """The same behaviour in this process only; expired entries vanish on the next access."""

    embedded = True

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[float, Any]] = {}

    def describe(self) -> str:
        return "in-process"

    def _get(self, kind: str, device_id: str) -> Any:
        entry = self._entries.get((kind, device_id))
        if entry is None:
            return None
        expires, value = entry
        if self._clock() >= expires:
            del self._entries[(kind, device_id)]
            return None
        return value

    def _set(self, kind: str, device_id: str, value: Any, ttl_s: int) -> None:
        self._entries[(kind, device_id)] = (self._clock() + ttl_s, value)

    async def ping(self) -> None:
        return None

    async def load_history(self, device_id: str) -> list[dict[str, Any]]:
        return _decode_history(self._get("history", device_id))

    async def save_history(self, device_id: str, messages: list[dict[str, Any]], ttl_s: int) -> None:
        self._set("history", device_id, json.dumps(messages, ensure_ascii=False), ttl_s)

    async def claim(self, device_id: str, session_id: str, replica_id: str, ttl_s: int) -> None:
        claim = {"session_id": session_id, "replica_id": replica_id, "claimed_at": repr(time.time())}
        self._set("live", device_id, claim, ttl_s)

    async def release(self, device_id: str, session_id: str) -> bool:
        claim = self._get("live", device_id)
        if claim is None or claim["session_id"] != session_id:
            return False
        del self._entries[("live", device_id)]
        return True

    async def live(self, device_ids: list[str]) -> dict[str, dict[str, str]]:
        found = {d: self._get("live", d) for d in device_ids}
        return {d: dict(claim) for d, claim in found.items() if claim}

    async def delete_device(self, device_id: str) -> int:
        found = self._get("history", device_id) is not None
        self._entries.pop(("history", device_id), None)
        return int(found)

    async def aclose(self) -> None:
        return None
