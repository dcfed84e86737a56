"""VoiceGrow behind the documented nginx (``deploy/config/nginx/nginx.conf``), through a real nginx.

Every speaker here has its own loopback source address (127.0.0.0/8 is all loopback on Linux), as
speakers in a home have their own addresses behind the proxy. With ``TRUSTED_PROXIES`` naming nginx the
replica sees and limits those addresses; without it every speaker is nginx, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from bench import nginx as nginx_proxy
from bench.nginx import Replica
from bench.storm import ReplicaProcess
from bench.xiaoai_emulator import run_emulator
from tests.conftest import REPO_ROOT, make_settings
from tests.service_fixtures import _unreachable
from voicegrow.app import running_server
from voicegrow.client import (
    ConnectFailed,
    HandshakeFailed,
    NativeClient,
    NativeClientError,
    connect_websocket_from,
    open_native_client,
)
from voicegrow.protocol.native import AudioFormat, Hello

NGINX_PEER = "127.0.0.1"  # nginx reaches the replicas from here
TRUSTED = {"trusted_proxies": "127.0.0.1/32"}


@contextlib.contextmanager
def running_nginx(folder: Path, replicas: list[Replica]) -> Iterator[nginx_proxy.Nginx]:
    """The repository's nginx.conf in a real nginx; missing nginx fails under CI, else skips."""
    try:
        with nginx_proxy.running_nginx(folder, replicas) as nginx:
            yield nginx
    except nginx_proxy.NginxUnavailable as exc:
        _unreachable(str(exc))


def speaker_address(index: int) -> str:
    """A distinct loopback address per simulated speaker, never nginx's own 127.0.0.1."""
    return f"127.0.{index // 250}.{index % 250 + 2}"


async def sessions(http_url: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as http:  # from 127.0.0.1: the box itself
        return (await http.get(f"{http_url}/api/v1/sessions")).json()["sessions"]


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, count: int, **settings: Any) -> AsyncIterator[list[Any]]:
    """Replicas on embedded defaults. Protocol detection waits as long as in production (1.5 s, not the
    test default's 0.3 s): tens of native clients through nginx on a loaded machine can take longer than
    0.3 s to send their hello, and one taken for a silent open-xiaoai speaker is answered in JSON text."""
    settings.setdefault("protocol_detect_ms", 1500)
    async with contextlib.AsyncExitStack() as stack:
        handles = [await stack.enter_async_context(running_server(make_settings(tmp_path / f"r{i}", **settings)))
                   for i in range(count)]
        yield handles


def as_replicas(handles: list[Any]) -> list[Replica]:
    return [Replica(h.ws_port, h.http_port) for h in handles]


@contextlib.asynccontextmanager
async def holding(url: str, addresses: list[str], **options: Any
                  ) -> AsyncIterator[tuple[list[NativeClient], list[NativeClientError]]]:
    """Native speakers from ``addresses``, one after another, held connected for the block."""
    connected: list[NativeClient] = []
    refused: list[NativeClientError] = []
    release = trio.Event()

    async def one(address: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with open_native_client(url, device_id=f"speaker-{address}", local_address=address,
                                          **options) as client:
                connected.append(client)
                task_status.started()
                await release.wait()
        except (ConnectFailed, HandshakeFailed) as exc:
            refused.append(exc)
            task_status.started()

    async with trio.open_nursery() as nursery:
        for address in addresses:
            await nursery.start(one, address)
        try:
            yield connected, refused
        finally:
            release.set()


@pytest.mark.slow
async def test_80_speakers_behind_nginx_are_admitted_by_their_own_addresses(tmp_path) -> None:
    addresses = [speaker_address(i) for i in range(80)]
    async with replicas(tmp_path, 1, **TRUSTED) as (replica,):
        with running_nginx(tmp_path / "nginx", as_replicas([replica])) as nginx:
            async with holding(nginx.url("ws"), addresses) as (clients, refused):
                assert not refused and len(clients) == 80  # the default MAX_SESSIONS_PER_IP is 50
                listed = await sessions(replica.http_url)
                assert sorted(s["remote_addr"] for s in listed) == sorted(addresses)
                assert {s["via_proxy"] for s in listed} == {NGINX_PEER}
                # Stored sessions name the speaker, not nginx.
                await replica.services.persistence.wait_delivered()
                for listed_session in listed[:5]:
                    stored = await replica.services.persistence.get_session(listed_session["session_id"])
                    assert stored is not None and stored["remote_addr"] == listed_session["remote_addr"]


@pytest.mark.slow
async def test_without_trusted_proxies_every_speaker_behind_nginx_is_nginx(tmp_path) -> None:
    addresses = [speaker_address(i) for i in range(80)]
    async with replicas(tmp_path, 1) as (replica,):
        with running_nginx(tmp_path / "nginx", as_replicas([replica])) as nginx:
            async with holding(nginx.url("ws"), addresses) as (clients, refused):
                assert len(clients) == replica.services.settings.max_sessions_per_ip == 50
                assert len(refused) == 30 and all("429" in str(e) for e in refused), refused[:1]
                assert {s["remote_addr"].rsplit(":", 1)[0] for s in await sessions(replica.http_url)} == {NGINX_PEER}


async def test_a_forged_forwarded_for_changes_nothing(tmp_path) -> None:
    forged = [(b"X-Forwarded-For", b"10.66.77.88"), (b"X-Real-IP", b"10.66.77.88")]
    async with replicas(tmp_path, 1, **TRUSTED) as (replica,):
        metric = replica.services.metrics.forwarded_ignored
        # Straight to the replica from an untrusted address: the headers are ignored and counted.
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_from(nursery, replica.ws_url, "127.0.0.9", extra_headers=forged)
            client = NativeClient(ws)
            await client.handshake(Hello("forger", AudioFormat(16000), AudioFormat(24000)))
            (listed,) = await sessions(replica.http_url)
            assert listed["remote_addr"].startswith("127.0.0.9:") and listed["via_proxy"] is None
            await client.close()
        assert metric.labels("ws")._value.get() == 1
        # The HTTP API: a forwarded "127.0.0.1" from elsewhere never earns the local bypass.
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.9")
        async with httpx.AsyncClient(transport=transport, timeout=10) as http:
            answer = await http.get(f"{replica.http_url}/api/v1/conversations",
                                    headers={"X-Forwarded-For": "127.0.0.1"})
        assert answer.status_code == 401 and answer.json()["error"] == "unauthorized"
        assert metric.labels("http")._value.get() == 1
        # Through nginx, a client's own X-Forwarded-For is left of the hop nginx appends: ignored too.
        with running_nginx(tmp_path / "nginx", as_replicas([replica])) as nginx:
            async with trio.open_nursery() as nursery:
                ws = await connect_websocket_from(nursery, nginx.url("ws"), "127.0.0.9", extra_headers=forged)
                client = NativeClient(ws)
                await client.handshake(Hello("forger", AudioFormat(16000), AudioFormat(24000)))
                (listed,) = await sessions(replica.http_url)
                assert listed["remote_addr"] == "127.0.0.9" and listed["via_proxy"] == NGINX_PEER
                await client.close()


@pytest.mark.slow
async def test_speakers_stick_to_a_replica_the_api_round_robins_and_tls_works(tmp_path) -> None:
    addresses = [speaker_address(i) for i in range(16)]
    async with replicas(tmp_path, 2, **TRUSTED) as handles:
        with running_nginx(tmp_path / "nginx", as_replicas(handles)) as nginx:
            tls = ssl.create_default_context(cafile=str(nginx.cert))

            async def holder_of(address: str) -> int:
                for index, handle in enumerate(handles):
                    if any(s["remote_addr"] == address for s in await sessions(handle.http_url)):
                        return index
                raise AssertionError(f"no replica holds {address}")

            placement: dict[str, set[int]] = {a: set() for a in addresses}
            for attempt in range(3):  # a blip: the same speaker reconnects, plain and over TLS
                url = nginx.url("wss") if attempt == 2 else nginx.url("ws")
                for address in addresses:
                    async with open_native_client(url, device_id=f"speaker-{address}", local_address=address,
                                                  ssl_context=tls):
                        placement[address].add(await holder_of(address))
            assert all(len(held) == 1 for held in placement.values()), placement  # sticky
            assert {next(iter(held)) for held in placement.values()} == {0, 1}  # both replicas serve
            # The API over https round-robins: with one speaker held on each replica, the session
            # lists alternate.
            by_replica = {next(iter(placement[a])): a for a in addresses}
            # A closed speaker leaves its replica's list a moment after the client returns.
            with trio.fail_after(10):
                while any([await sessions(h.http_url) for h in handles]):
                    await trio.sleep(0.05)
            async with holding(nginx.url("ws"), list(by_replica.values())):
                async with httpx.AsyncClient(verify=tls, timeout=10) as http:
                    seen = set()
                    for _ in range(6):
                        answer = await http.get(nginx.url("https", "/api/v1/sessions"))
                        assert answer.status_code == 200, answer.text
                        seen.add(tuple(s["remote_addr"] for s in answer.json()["sessions"]))
                assert seen == {(by_replica[0],), (by_replica[1],)}


class _Overloaded:
    """A load monitor past its threshold (sessions/load.py's refusal, whatever the signal)."""

    def refusal(self) -> str:
        return "overloaded: test"


async def test_an_overloaded_replica_sends_its_new_speakers_to_the_other_through_nginx(tmp_path) -> None:
    """503 + Retry-After at the handshake and nginx's proxy_next_upstream http_503: the speaker whose
    hash names the overloaded replica is served by the other, and its speakers stay where they are."""
    addresses = [speaker_address(i) for i in range(8)]
    async with replicas(tmp_path, 2, **TRUSTED) as handles:
        with running_nginx(tmp_path / "nginx", as_replicas(handles)) as nginx:
            async with holding(nginx.url("ws"), addresses) as (connected, refused):
                assert len(connected) == len(addresses) and not refused
                placed = {i: {s["remote_addr"] for s in await sessions(h.http_url)} for i, h in enumerate(handles)}
            busy_addresses = sorted(placed[0])
            assert busy_addresses and placed[1], placed  # the hash spreads them over both
            with trio.fail_after(10):
                while any([await sessions(h.http_url) for h in handles]):
                    await trio.sleep(0.05)
            handles[0].services.load = _Overloaded()
            async with holding(nginx.url("ws"), busy_addresses) as (connected, refused):
                assert len(connected) == len(busy_addresses) and not refused
                assert {s["remote_addr"] for s in await sessions(handles[1].http_url)} == set(busy_addresses)
                assert await sessions(handles[0].http_url) == []
            # Each refusal counts; after max_fails (3) of them nginx stops trying replica 0 for fail_timeout.
            hits = handles[0].services.metrics.limit_hits.labels("overloaded")._value.get()
            assert 1 <= hits <= len(busy_addresses)


# -- a replica stopped with SIGTERM: its speakers move to the other one ---------------------------------------

@pytest.mark.slow
async def test_a_sigtermed_replicas_speakers_are_served_by_the_other_within_5_s(tmp_path) -> None:
    processes = [ReplicaProcess(tmp_path / f"replica{i}") for i in range(2)]
    for process in processes:
        process.start()
    try:
        with running_nginx(tmp_path / "nginx", [Replica(p.ws_port, p.http_port) for p in processes]) as nginx:
            addresses = [speaker_address(i) for i in range(12)]
            async with contextlib.AsyncExitStack() as stack:
                speakers = {a: await stack.enter_async_context(run_emulator(
                    nginx.url("ws"), serial=f"SN{a}", source_address=a, auto_reconnect=True,
                    retry_interval=0.2)) for a in addresses}
                with trio.fail_after(20):
                    for emu in speakers.values():
                        await emu.wait_for_request("start_play", timeout=20)
                held = {a for a in addresses if any(s["remote_addr"] == a for s in await sessions(processes[0].http_url))}
                assert held and held != set(addresses), held  # both replicas hold some
                arms_before = {a: speakers[a].connections for a in held}
                stopped_at = trio.current_time()
                processes[0].proc.send_signal(signal.SIGTERM)
                with trio.fail_after(30):
                    while True:
                        on_other = {s["remote_addr"] for s in await sessions(processes[1].http_url)}
                        rearmed = {a for a in held if speakers[a].connections > arms_before[a]
                                   and speakers[a].recording and speakers[a].playing}
                        if held <= on_other and rearmed == held:
                            break
                        await trio.sleep(0.1)
                moved_in = trio.current_time() - stopped_at
                assert await trio.to_thread.run_sync(processes[0].wait) == 0
                assert moved_in < 5, f"took {moved_in:.1f} s"
    finally:
        for process in processes:
            process.stop()


@pytest.mark.slow
def test_bench_storm_in_a_tiny_configuration(tmp_path) -> None:
    out = tmp_path / "storm.json"
    result = subprocess.run([sys.executable, "-m", "bench", "storm", "--speakers", "4", "--json", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert figures["back"] == figures["back_within_target"] == 4 and figures["old_replica_exit_code"] == 0
    assert figures["distinct_addresses_listed"] == 4 and not figures["limit_hits"].get("connect_rate")
    assert "| reconnect storm | figure |" in result.stdout


async def test_an_esp32_board_finds_and_reaches_a_replica_through_nginx(tmp_path) -> None:
    """A stock xiaozhi board: its OTA check and its WebSocket both go through nginx's plain port 8000."""
    from bench.xiaozhi_emulator import DEFAULT_DEVICE_ID, run_xiaozhi_emulator

    async with replicas(tmp_path, 1, **TRUSTED) as (replica,):
        with running_nginx(tmp_path / "nginx", as_replicas([replica])) as nginx:
            board = {"Device-Id": DEFAULT_DEVICE_ID, "Client-Id": "c-1", "Activation-Version": "1"}
            transport = httpx.AsyncHTTPTransport(local_address="127.0.0.33")
            async with httpx.AsyncClient(transport=transport, timeout=10) as http:
                answer = await http.post(nginx.url("device_http", "/xiaozhi/ota/"), headers=board,
                                         json={"version": 2, "mac_address": DEFAULT_DEVICE_ID, "uuid": "c-1",
                                               "application": {"version": "1.6.0"}})
            assert answer.status_code == 200, answer.text
            assert answer.json()["websocket"]["url"].endswith("/xiaozhi/v1/")
            async with run_xiaozhi_emulator(nginx.url("ws", "/xiaozhi/v1/").replace(
                    str(nginx.ports["ws"]), str(nginx.ports["device_http"]))) as emu:
                assert emu.session_id
                (listed,) = await sessions(replica.http_url)
                assert listed["protocol"] == "xiaozhi" and listed["via_proxy"] == NGINX_PEER
