"""Replicas sharing a Redis see each other's sessions, and an admin action reaches the replica holding one.

Two whole servers in this process, each with its own data directory, ports and ``REPLICA_ID``, share
the machine's Redis under a key prefix of this test's own (``redis_prefix``).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio

from tests.conftest import make_settings
from voicegrow.app import ServerHandle, running_server
from voicegrow.client import ConnectionClosed, open_native_client
from voicegrow.sessions.cluster import ClusterView
from voicegrow.sessions.registry import SessionInfo, SessionRegistry
from voicegrow.sessions.view import LocalWorker, SessionView

TOKEN = "cluster-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def two_replicas(tmp_path: Path, server: dict[str, Any], prefix: str) -> AsyncIterator[list[ServerHandle]]:
    async with contextlib.AsyncExitStack() as stack:
        handles = []
        for name in ("vg-a", "vg-b"):
            settings = make_settings(tmp_path / name, **server, redis_key_prefix=prefix, replica_id=name,
                                     admin_token=TOKEN, cluster_heartbeat_s=0.5)
            handles.append(await stack.enter_async_context(running_server(settings)))
        yield handles


async def listing(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    answer = await http.get(f"{url}/api/v1/sessions", headers=AUTH)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def until_listed(http: httpx.AsyncClient, url: str, expected: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """Poll ``url``'s listing until its (device, replica) pairs are ``expected``; fail after 20 s."""
    seen: set[tuple[str, str]] = set()
    with trio.move_on_after(20):
        while True:
            items = (await listing(http, url))["sessions"]
            seen = {(s["device_id"], s["replica"]) for s in items}
            if seen == expected:
                return items
            await trio.sleep(0.05)
    raise AssertionError(f"{url} listed {sorted(seen)}, expected {sorted(expected)}")


async def test_either_replica_lists_both_and_closes_a_speaker_held_by_the_other(
        tmp_path: Path, redis_server: dict[str, Any], redis_prefix: str) -> None:
    async with two_replicas(tmp_path, redis_server, redis_prefix) as (a, b), httpx.AsyncClient(timeout=10) as http:
        async with open_native_client(a.ws_url, device_id="hall") as on_a, \
                open_native_client(b.ws_url, device_id="kitchen") as on_b:
            both = {("hall", "vg-a"), ("kitchen", "vg-b")}
            await until_listed(http, a.http_url, both)
            items = await until_listed(http, b.http_url, both)
            held_by_b = next(s["session_id"] for s in items if s["device_id"] == "kitchen")
            assert (await listing(http, a.http_url))["workers_missing"] == []

            # An admin action through A reaches the speaker that B holds (Redis pub/sub) ...
            closed = await http.delete(f"{a.http_url}/api/v1/sessions/{held_by_b}", headers=AUTH)
            assert closed.status_code == 202, closed.text
            with trio.fail_after(20), pytest.raises(ConnectionClosed) as ended:
                while True:
                    await on_b.next_frame()
            assert ended.value.close_code == 1000  # a goodbye, as a local close says it
            # ... and leaves A's own speaker alone; both replicas stop listing the closed one.
            await until_listed(http, a.http_url, {("hall", "vg-a")})
            await until_listed(http, b.http_url, {("hall", "vg-a")})
            gone = await http.delete(f"{a.http_url}/api/v1/sessions/{held_by_b}", headers=AUTH)
            assert gone.status_code == 404


async def test_a_replica_that_stops_leaves_the_listing_at_once(
        tmp_path: Path, redis_server: dict[str, Any], redis_prefix: str) -> None:
    settings = make_settings(tmp_path / "a", **redis_server, redis_key_prefix=redis_prefix, replica_id="vg-a",
                             admin_token=TOKEN, cluster_heartbeat_s=0.5)
    async with running_server(settings) as a, httpx.AsyncClient(timeout=10) as http:
        async with running_server(make_settings(tmp_path / "b", **redis_server, redis_key_prefix=redis_prefix,
                                                replica_id="vg-b", cluster_heartbeat_s=0.5)) as b:
            async with open_native_client(b.ws_url, device_id="porch"):
                await until_listed(http, a.http_url, {("porch", "vg-b")})
        # B drained (SIGTERM's path: sessions closed, server stopped) and deleted its entry on the way out.
        members = await a.services.live.members()
        assert [m["replica"] for m in members] == ["vg-a"]
        assert (await listing(http, a.http_url))["sessions"] == []


class _StubServices:
    def __init__(self) -> None:
        self.registry = SessionRegistry()
        self.accepting = True
        self.uptime_s = 1.0
        self.asr = types.SimpleNamespace(health=lambda: {"status": "ok"})


def _view(server: dict[str, Any], prefix: str, replica_id: str, services: _StubServices) -> ClusterView:
    client = redis.Redis(host=server["redis_host"], port=server["redis_port"],
                         password=server["redis_password"] or None, decode_responses=True, socket_timeout=2)
    local = LocalWorker(services)
    return ClusterView(local, SessionView(local), client, key_prefix=prefix, replica_id=replica_id,
                       heartbeat_s=0.2)


async def test_the_entries_of_a_replica_that_died_expire_with_its_heartbeat(
        redis_server: dict[str, Any], redis_prefix: str) -> None:
    here_services, dead_services = _StubServices(), _StubServices()
    dead_services.registry.add(SessionInfo("s-dead", "10.0.0.9:4000", protocol="xiaoai", device_id="attic"))
    here = _view(redis_server, redis_prefix, "vg-here", here_services)
    dead = _view(redis_server, redis_prefix, "vg-dead", dead_services)
    dead._leave_blocking = lambda: None  # type: ignore[method-assign]  # killed: it never says goodbye
    async with trio.open_nursery() as nursery:
        await nursery.start(here.run)
        dead_scope = trio.CancelScope()
        nursery.start_soon(_run_in, dead_scope, dead)
        with trio.fail_after(10):
            while not (await here.sessions())[0]:
                await trio.sleep(0.02)
        (item,), missing = await here.sessions()
        assert (item["session_id"], item["replica"], missing) == ("s-dead", "vg-dead", [])
        dead_scope.cancel()  # its heartbeat stops; its key lives out its TTL (3 heartbeats, at least 1 s)
        with trio.fail_after(10):
            while (await here.sessions())[0]:
                await trio.sleep(0.05)
        assert not await here.close_session("s-dead")
        nursery.cancel_scope.cancel()


async def _run_in(scope: trio.CancelScope, view: ClusterView) -> None:
    with scope:
        await view.run()


async def test_redis_away_lists_this_box_and_says_so(private_redis: Any) -> None:
    services = _StubServices()
    services.registry.add(SessionInfo("s-1", "10.0.0.1:4000", protocol="native", device_id="den"))
    view = _view({"redis_host": "127.0.0.1", "redis_port": private_redis.port, "redis_password": ""},
                 "vgtest:away:", "vg-1", services)
    async with trio.open_nursery() as nursery:
        await nursery.start(view.run)
        private_redis.stop()
        items, missing = await view.sessions()
        assert [(s["session_id"], s["replica"]) for s in items] == [("s-1", "vg-1")] and missing == ["redis"]
        private_redis.start()
        with trio.fail_after(10):
            while (await view.sessions())[1]:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_a_listen_mode_set_through_one_replica_reaches_the_speaker_the_other_holds(
        tmp_path: Path, redis_server: dict[str, Any], redis_prefix: str, mysql_db: dict[str, Any]) -> None:
    async with two_replicas(tmp_path, {**redis_server, **mysql_db}, redis_prefix) as (a, b), \
            httpx.AsyncClient(timeout=10) as http:
        async with open_native_client(b.ws_url, device_id="kitchen", capabilities={"listen_mode": "always"}):
            await until_listed(http, a.http_url, {("kitchen", "vg-b")})
            await b.services.persistence.wait_records_delivered()  # the shared device row exists
            url = f"{a.http_url}/api/v1/devices/kitchen/listen-mode"
            answer = await http.put(url, json={"mode": "wake"}, headers=AUTH)
            assert answer.status_code == 200, answer.text
            assert [(s["replica"], s["listen_mode"]) for s in answer.json()["applied_to"]] == [("vg-b", "wake")]
            (held,) = list(b.services.registry)
            with trio.fail_after(20):
                while held.listen_mode != "wake":  # B's session, told over its Redis channel
                    await trio.sleep(0.05)
            assert (await http.get(f"{b.http_url}/api/v1/devices/kitchen/listen-mode",
                                   headers=AUTH)).json()["override"] == "wake"  # one record store
            assert (await http.delete(url, headers=AUTH)).status_code == 200
            with trio.fail_after(20):
                while held.listen_mode != "always":
                    await trio.sleep(0.05)
