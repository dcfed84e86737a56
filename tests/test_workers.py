"""WORKERS=N: a supervisor, worker processes sharing both ports, and one view of the box.

The end-to-end tests run ``python -m voicegrow serve`` with WORKERS=2 as a subprocess on port 0 (the
supervisor picks the ports and logs them). Sessions here only connect: no ASR model is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from voicegrow.client import ConnectionClosed, NativeClient, open_native_client
from voicegrow.protocol.native import Ping, Pong
from voicegrow.sessions.registry import SessionInfo, SessionRegistry
from voicegrow.sessions.view import LocalWorker
from voicegrow.storage.sqlite_state import SQLiteState
from voicegrow.workers.control import Box, ControlServer
from voicegrow.workers.listeners import bind_shared, reuse_port_supported

START_TIMEOUT_S = 90  # two interpreters importing the server on two shared cores


# -- units -------------------------------------------------------------------------------------------------


def test_bind_shared_gives_every_worker_the_same_free_port() -> None:
    sockets = bind_shared("127.0.0.1", 0, 3)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(ports) == 1 and ports != {0}
        assert len({sock.fileno() for sock in sockets}) == (3 if reuse_port_supported() else 1)
        with socket.create_connection(("127.0.0.1", ports.pop()), timeout=5):
            pass  # listening already: the kernel completes the handshake into one of the backlogs
    finally:
        for sock in sockets:
            sock.close()


async def test_sqlite_state_is_shared_between_workers(tmp_path: Path) -> None:
    """Two stores on one file stand for two workers: history and claims written by one are seen by the other."""
    first, second = SQLiteState(tmp_path / "state.sqlite3"), SQLiteState(tmp_path / "state.sqlite3")
    try:
        history = [{"role": "user", "content": "几点了"}, {"role": "assistant", "content": "七点半。"}]
        await first.save_history("kitchen", history, ttl_s=60)
        assert await second.load_history("kitchen") == history
        await first.claim("kitchen", "s-1", "box/worker-0", ttl_s=60)
        await second.claim("kitchen", "s-2", "box/worker-1", ttl_s=60)  # the speaker reconnected elsewhere
        assert not await first.release("kitchen", "s-1")  # the old session must not drop the new claim
        assert (await first.live(["kitchen", "hall"]))["kitchen"]["session_id"] == "s-2"
        assert await second.release("kitchen", "s-2")
        assert await first.live(["kitchen"]) == {}
        assert await second.delete_device("kitchen") == 1
        assert await first.load_history("kitchen") == []
        await first.save_history("hall", history, ttl_s=0)
        assert await second.load_history("hall") == []  # expired at once
    finally:
        await first.aclose()
        await second.aclose()


class _StubServices:
    """What LocalWorker reads of the services: a registry, the ASR's health, whether it accepts."""

    def __init__(self) -> None:
        self.registry = SessionRegistry()
        self.accepting = True
        self.uptime_s = 1.0
        self.asr = types.SimpleNamespace(health=lambda: {"status": "ok", "model": "base"})


async def test_box_answers_for_every_worker_and_says_which_did_not(tmp_path: Path) -> None:
    here, there = _StubServices(), _StubServices()
    here.registry.add(SessionInfo("s-here", "127.0.0.1:1000", protocol="native", device_id="hall"))
    closed: list[tuple[int, str]] = []
    there_info = SessionInfo("s-there", "127.0.0.1:2000", protocol="xiaoai", device_id="kitchen")
    there_info.request_close = lambda code, reason: closed.append((code, reason))
    there.registry.add(there_info)
    async with trio.open_nursery() as nursery:
        await nursery.start(ControlServer(LocalWorker(there, index=1), tmp_path / "worker-1.sock").run)
        box = Box(LocalWorker(here, index=0), {1: tmp_path / "worker-1.sock", 2: tmp_path / "worker-2.sock"},
                  timeout_s=1.0)
        items, missing = await box.sessions()
        assert {(s["session_id"], s["worker"]) for s in items} == {("s-here", 0), ("s-there", 1)}
        assert missing == [2]  # worker 2 is not running: the answer is partial and says so
        workers = await box.workers()
        assert [(w["worker"], w["status"]) for w in workers] == [(0, "ok"), (1, "ok"), (2, "down")]
        assert workers[1]["sessions"] == 1 and workers[1]["pid"] == os.getpid()
        assert await box.close_session("s-there") and closed == [(1000, "closed by an administrator")]
        assert not await box.close_session("s-nowhere")
        nursery.cancel_scope.cancel()
    assert not (tmp_path / "worker-1.sock").exists()


async def test_a_listen_mode_reaches_the_worker_holding_the_device(tmp_path: Path) -> None:
    from voicegrow.listening import ListenMode

    here, there = _StubServices(), _StubServices()
    modes: list[ListenMode | None] = []
    info = SessionInfo("s-there", "127.0.0.1:2000", protocol="xiaoai", device_id="kitchen")
    info.set_listen_mode = lambda mode: modes.append(mode) or (mode or ListenMode.WAKE)
    there.registry.add(info)
    async with trio.open_nursery() as nursery:
        await nursery.start(ControlServer(LocalWorker(there, index=1), tmp_path / "worker-1.sock").run)
        box = Box(LocalWorker(here, index=0), {1: tmp_path / "worker-1.sock"}, timeout_s=1.0)
        assert await box.set_listen_mode("kitchen", "always") == [
            {"session_id": "s-there", "listen_mode": "always", "worker": 1}]
        assert await box.set_listen_mode("kitchen", None) == [
            {"session_id": "s-there", "listen_mode": "wake", "worker": 1}]  # the settings' mode again
        assert await box.set_listen_mode("hall", "wake") == []
        assert modes == [ListenMode.ALWAYS, None]
        nursery.cancel_scope.cancel()


async def test_an_admin_closes_a_live_session_with_one_process_too(tmp_path: Path) -> None:
    from tests.conftest import make_settings
    from voicegrow.app import running_server

    async with running_server(make_settings(tmp_path, admin_token="s3cret-token")) as server, \
            httpx.AsyncClient(base_url=server.http_url) as http:
        auth = {"Authorization": "Bearer s3cret-token"}
        async with open_native_client(server.ws_url, device_id="porch") as client:
            (session,) = (await http.get("/api/v1/sessions", headers=auth)).json()["sessions"]
            assert session["worker"] == 0
            refused = await http.delete(f"/api/v1/sessions/{session['session_id']}")
            assert refused.status_code == 401  # an admin action: the token is required
            malformed = await http.delete("/api/v1/sessions/" + "x" * 65, headers=auth)
            assert malformed.status_code == 400 and malformed.json()["error"] == "invalid_session_id"
            closed = await http.delete(f"/api/v1/sessions/{session['session_id']}", headers=auth)
            assert closed.status_code == 202
            with trio.fail_after(10), pytest.raises(ConnectionClosed) as ended:
                while True:
                    await client.next_frame()
            assert ended.value.close_code == 1000
        detail = (await http.get("/api/v1/health/detail", headers=auth)).json()
        assert [w["worker"] for w in detail["workers"]] == [0] and detail["workers"][0]["restarts"] == 0


async def test_spool_of_a_worker_beyond_workers_is_delivered(tmp_path: Path) -> None:
    """WORKERS lowered from 2 to 1: what worker 1 left spooled reaches the records all the same."""
    from tests.conftest import make_settings
    from voicegrow.storage.persistence import Persistence
    from voicegrow.storage.spool import Spool

    settings = make_settings(tmp_path)
    left = Spool(Path(settings.data_dir) / "spool" / "worker-1" / "mysql")
    await left.open()
    await left.append({"op": "device_seen", "device_id": "attic", "info": {"protocol": "xiaoai"}, "seen_at": 1.0})
    persistence = Persistence.from_settings(settings, retry_initial_s=0.05, probe_interval_s=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(persistence.run)
        with trio.fail_after(10):
            while not (await persistence.list_devices()).items:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert [d["device_id"] for d in (await persistence.list_devices()).items] == ["attic"]
    assert not list((Path(settings.data_dir) / "spool" / "worker-1" / "mysql").glob("*.rec"))


# -- the server as a subprocess ---------------------------------------------------------------------------------


class ServedBox:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path, ws_port: int, http_port: int) -> None:
        self.proc, self.log = proc, log
        self.ws_url = f"ws://127.0.0.1:{ws_port}"
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def detail(self) -> dict[str, Any]:
        response = await self.http.get("/api/v1/health/detail")
        assert response.status_code == 200, response.text
        return response.json()

    async def sessions(self) -> dict[str, Any]:
        response = await self.http.get("/api/v1/sessions")
        assert response.status_code == 200, response.text
        return response.json()

    async def wait_workers_ok(self, *, not_pids: set[int] = frozenset()) -> list[dict[str, Any]]:
        with trio.fail_after(START_TIMEOUT_S):
            while True:
                assert self.proc.poll() is None, self.output()[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    workers = (await self.detail())["workers"]
                    if all(w["status"] == "ok" and w["pid"] not in not_pids for w in workers):
                        return workers
                await trio.sleep(0.2)


@contextlib.contextmanager
def _serve(tmp_path: Path, **extra: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MYSQL_", "REDIS_", "MINIO_", "LLM_", "TTS_", "PROMETHEUS_"))}
    env.update(WORKERS="2", WS_PORT="0", HTTP_PORT="0", SERVER_HOST="127.0.0.1", DATA_DIR=str(tmp_path / "data"),
               ASR_MODEL_SIZE="base", ASR_PRELOAD="false", SHUTDOWN_GRACE_S="5", LOG_FORMAT="json", **extra)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "voicegrow", "--env-file", "/nonexistent", "serve"],
                                env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.asynccontextmanager
async def running_box(tmp_path: Path, **extra: str) -> AsyncIterator[ServedBox]:
    with _serve(tmp_path, **extra) as (proc, log):
        ports = None
        with trio.fail_after(START_TIMEOUT_S):
            while ports is None:
                assert proc.poll() is None, log.read_text()
                for line in log.read_text(errors="replace").splitlines():
                    if line.startswith("{") and "ws_port" in line and "supervisor" in line:
                        entry = json.loads(line)
                        ports = entry["ws_port"], entry["http_port"]
                await trio.sleep(0.1)
        box = ServedBox(proc, log, *ports)
        async with box.http:
            await box.wait_workers_ok()
            yield box


async def _connect_until_both_workers(box: ServedBox, stack: contextlib.AsyncExitStack,
                                      clients: dict[str, NativeClient], *, want: set[int] = frozenset({0, 1}),
                                      prefix: str = "speaker") -> dict[str, int]:
    """Speakers connect until the kernel has spread them over every worker in ``want``; device → worker."""
    placed: dict[str, int] = {}
    for number in range(24):  # each lands on a worker by a hash of its address: 2^-23 to miss one
        device = f"{prefix}-{number}"
        clients[device] = await stack.enter_async_context(open_native_client(box.ws_url, device_id=device))
        listing = await box.sessions()
        placed = {s["device_id"]: s["worker"] for s in listing["sessions"] if s["device_id"].startswith(prefix)}
        if device in placed and want <= set(placed.values()):
            return placed
    raise AssertionError(f"24 speakers did not reach workers {want}: {placed}")


async def _alive(client: NativeClient, nonce: int) -> bool:
    await client.send(Ping(nonce=nonce))
    with trio.fail_after(10):
        while True:
            frame = await client.next_frame()
            if isinstance(frame, Pong) and frame.nonce == nonce:
                return True


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def test_two_workers_one_view_and_sigterm_drains_both(tmp_path: Path) -> None:
    async with running_box(tmp_path) as box, contextlib.AsyncExitStack() as stack:
        clients: dict[str, NativeClient] = {}
        placed = await _connect_until_both_workers(box, stack, clients)
        for _ in range(10):  # whichever worker takes the request answers for both
            listing = await box.sessions()
            assert {s["device_id"]: s["worker"] for s in listing["sessions"]} == placed
            assert listing["count"] == len(placed) and listing["workers_missing"] == []
        detail = await box.detail()
        assert detail["sessions"] == len(placed)
        assert [w["worker"] for w in detail["workers"]] == [0, 1]
        assert all(w["rss_bytes"] > 0 and w["asr"]["status"] for w in detail["workers"])
        with trio.fail_after(10):  # each worker refreshes its gauges every second
            while True:
                text = (await box.http.get("/metrics")).text
                per_worker = {w: _metric_sum(text, f'voicegrow_worker_sessions{{worker="{w}"}}') for w in (0, 1)}
                if (_metric_sum(text, "voicegrow_sessions_active") == len(placed)
                        and per_worker == {w: list(placed.values()).count(w) for w in (0, 1)}):
                    break
                await trio.sleep(0.2)

        box.proc.send_signal(signal.SIGHUP)  # passed on to the workers, which take it and keep serving
        with trio.fail_after(10):
            while box.output().count("received SIGHUP") < 2:
                await trio.sleep(0.05)
        assert [w["pid"] for w in (await box.detail())["workers"]] == [w["pid"] for w in detail["workers"]]

        box.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            for device, client in clients.items():  # every speaker, on both workers, is told goodbye
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await client.next_frame()
                assert closed.value.close_code in (1000, 1001), device
            while box.proc.poll() is None:
                await trio.sleep(0.05)
    assert box.proc.returncode == 0, box.output()[-3000:]
    assert "every worker stopped" in box.output()


async def test_killed_worker_is_replaced_and_the_other_is_untouched(tmp_path: Path) -> None:
    async with running_box(tmp_path) as box, contextlib.AsyncExitStack() as stack:
        clients: dict[str, NativeClient] = {}
        placed = await _connect_until_both_workers(box, stack, clients)
        before = {w["worker"]: w for w in (await box.detail())["workers"]}
        survivors = {s["session_id"]: s["device_id"] for s in (await box.sessions())["sessions"] if s["worker"] == 0}

        os.kill(before[1]["pid"], signal.SIGKILL)
        workers = await box.wait_workers_ok(not_pids={before[1]["pid"]})
        assert workers[0]["pid"] == before[0]["pid"] and workers[1]["restarts"] == 1

        listing = await box.sessions()
        assert {s["session_id"]: s["device_id"] for s in listing["sessions"] if s["worker"] == 0} == survivors
        assert not [s for s in listing["sessions"] if s["worker"] == 1]  # the dead worker's speakers are gone
        for nonce, device in enumerate(survivors.values()):
            assert await _alive(clients[device], nonce)
        new = await _connect_until_both_workers(box, stack, clients, want={1}, prefix="after")
        assert 1 in new.values()  # the replacement serves new speakers
        for nonce, device in enumerate(d for d, w in new.items() if w == 1):
            assert await _alive(clients[device], 100 + nonce)
        assert "worker 1 (pid %d) exited with status -9" % before[1]["pid"] in box.output()

        # An admin action reaches the session whichever worker holds it and whichever takes the request.
        listing = (await box.sessions())["sessions"]
        for worker in (0, 1):
            target = next(s for s in listing if s["worker"] == worker)
            response = await box.http.delete(f"/api/v1/sessions/{target['session_id']}")
            assert response.status_code == 202 and response.json()["closing"] is True
            with trio.fail_after(10), pytest.raises(ConnectionClosed):
                while True:
                    await clients[target["device_id"]].next_frame()
            with trio.fail_after(10):
                while target["session_id"] in {s["session_id"] for s in (await box.sessions())["sessions"]}:
                    await trio.sleep(0.05)
        missing = await box.http.delete("/api/v1/sessions/no-such-session")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"

        box.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            while box.proc.poll() is None:
                await trio.sleep(0.05)
    assert box.proc.returncode == 0, box.output()[-3000:]
    assert placed  # (the first speakers reached both workers)


async def test_a_speaker_that_lands_on_the_other_worker_continues_its_conversation(tmp_path: Path,
                                                                                  audio_fixtures: Path) -> None:
    """Embedded stores, no Redis: turn one on one worker, reconnect until the other takes the speaker,
    turn two there; the history the second worker saved holds both turns, so it had read the first."""
    from bench.fake_ai import FakeAiConfig, run_fake_ai
    from voicegrow.audio import read_wav
    from voicegrow.client import stream_wav_and_collect

    def clip(name: str) -> bytes:
        samples, _ = read_wav(audio_fixtures / f"{name}.wav")
        return samples.astype("<i2").tobytes()

    async with run_fake_ai(FakeAiConfig(ttft_ms=50, tokens_per_s=200, tts_ms_per_char=5)) as ai, \
            running_box(tmp_path, LLM_BASE_URL=ai.url, TTS_BASE_URL=ai.url, ASR_LANGUAGE="en") as box:
        transcripts, workers = [], []
        for name in ("en-00", "en-01"):
            for _ in range(24):  # until the kernel hands this connection to a worker not used yet
                async with open_native_client(box.ws_url, device_id="den") as client:
                    listing = (await box.sessions())["sessions"]
                    worker = next(s["worker"] for s in listing if s["device_id"] == "den")
                    if worker in workers:
                        continue
                    result = await stream_wav_and_collect(client, clip(name), speed=2.0, timeout_s=90)
                assert result.transcript, result
                transcripts.append(result.transcript)
                workers.append(worker)
                break
        assert sorted(workers) == [0, 1]
        with trio.fail_after(10):
            while True:
                with sqlite3.connect(tmp_path / "data" / "state.sqlite3") as db:
                    row = db.execute("SELECT value FROM live_state WHERE kind = 'history' AND device_id = 'den'"
                                     ).fetchone()
                said = [m["content"] for m in json.loads(row[0]) if m["role"] == "user"] if row else []
                if len(said) == 2:
                    break
                await trio.sleep(0.1)
        assert said == transcripts
        box.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            while box.proc.poll() is None:
                await trio.sleep(0.05)
    assert box.proc.returncode == 0


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; whoever adopted it reaps it in its own time


async def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    async with running_box(tmp_path) as box:
        pids = [w["pid"] for w in (await box.detail())["workers"]]
        box.proc.kill()  # SIGKILL: the supervisor cannot pass anything on
        box.proc.wait()
        try:
            with trio.fail_after(20):  # each worker sees the pipe's end and drains (SHUTDOWN_GRACE_S=5)
                while any(_running(pid) for pid in pids):
                    await trio.sleep(0.1)
        finally:
            for pid in filter(_running, pids):  # never leave orphans behind a failed test
                os.kill(pid, signal.SIGKILL)
    assert "the supervisor is gone: shutting down" in box.output()
