"""Memory that must stay bounded over a long run, and the allocation report that finds what does not.

No timing and no RSS figures here (the machine is shared and RSS is noisy): each test drives a
structure through many lifetimes of what it holds and checks that nothing of them is left.
"""

from __future__ import annotations

import collections
import gc
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.pipeline.asr import AsrError
from voicegrow.memprofile import MemoryTracer


TOKEN = "memory-test-admin-token-0123456789"

# -- the allocation report ------------------------------------------------------------------------------


def test_tracer_reports_the_growing_line() -> None:
    tracer = MemoryTracer(4)
    try:
        kept = [bytearray(10_000) for _ in range(200)]  # ~2 MB allocated on this line after the baseline
        report = tracer.report(limit=5)
    finally:
        tracer.close()
    assert report["frames"] == 4
    assert report["traced_growth_bytes"] >= 200 * 10_000
    top = report["top"][0]
    assert top["site"].endswith("test_memory.py:" + str(_line_of("kept = [bytearray(10_000)")))
    assert top["size_diff_bytes"] >= 200 * 10_000 and top["count_diff"] >= 200
    assert top["traceback"][0] == top["site"]  # most recent frame first
    assert len(kept) == 200


def test_tracer_baseline_reset_forgets_earlier_growth() -> None:
    tracer = MemoryTracer(1)
    try:
        kept = [bytearray(10_000) for _ in range(100)]
        tracer.reset_baseline()
        report = tracer.report(limit=5)
    finally:
        tracer.close()
    assert all(s["size_diff_bytes"] < 100 * 10_000 for s in report["top"])
    assert len(kept) == 100
    with pytest.raises(ValueError):
        MemoryTracer(0)


def _line_of(text: str) -> int:
    for number, line in enumerate(Path(__file__).read_text(encoding="utf-8").splitlines(), 1):
        if text in line and "_line_of" not in line:
            return number
    raise AssertionError(text)


async def test_memory_endpoints_are_admin_only_and_report_without_tracing(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path, admin_token=TOKEN)) as server:  # token, no tracing
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            for method, path in (("GET", "/api/v1/debug/memory"), ("POST", "/api/v1/debug/memory/release"),
                                 ("POST", "/api/v1/debug/memory/baseline")):
                assert (await http.request(method, path)).status_code == 401  # as the rest of the admin API
            http.headers["Authorization"] = f"Bearer {TOKEN}"
            report = (await http.get("/api/v1/debug/memory")).json()
            assert report["tracing"] is None and report["rss_bytes"] > 0
            assert report["malloc"]["in_use_bytes"] > 0 and report["malloc"]["free_held_bytes"] >= 0
            assert report["malloc_arenas"] >= 1  # the full report (limit 20 by default) counts glibc's arenas
            cheap = (await http.get("/api/v1/debug/memory", params={"limit": "0"})).json()
            assert cheap["malloc_arenas"] is None and cheap["malloc"]["in_use_bytes"] > 0
            assert len(report["gc"]["collections"]) == 3 and report["gc"]["uncollectable"] >= 0
            response = await http.post("/api/v1/debug/memory/baseline")
            assert response.status_code == 404 and response.json()["error"] == "memory_trace_off"
            released = (await http.post("/api/v1/debug/memory/release")).json()
            assert released["gc_collected_objects"] >= 0 and released["rss_after_trim_bytes"] > 0
            assert released["rss_after_gc_bytes"] > 0 and released["malloc_after_trim"]["in_use_bytes"] > 0


async def test_memory_endpoint_reports_growth_since_the_baseline(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, admin_token=TOKEN, memory_trace_frames=3)
    async with running_server(settings) as server:
        assert server.services.memory_tracer is not None
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            assert (await http.get("/api/v1/debug/memory")).status_code == 401
            http.headers["Authorization"] = f"Bearer {TOKEN}"
            baseline = await http.post("/api/v1/debug/memory/baseline")
            assert baseline.status_code == 200 and baseline.json()["traced_bytes"] > 0
            report = (await http.get("/api/v1/debug/memory", params={"limit": "3"})).json()["tracing"]
            assert report["frames"] == 3 and len(report["top"]) <= 3
            assert report["seconds_since_baseline"] >= 0 and report["tracer_overhead_bytes"] > 0
            for site in report["top"]:
                assert site["size_diff_bytes"] > 0 and 1 <= len(site["traceback"]) <= 3
            assert (await http.get("/api/v1/debug/memory", params={"limit": "0"})).json()["tracing"] is None
            for bad in ({"limit": "201"}, {"limit": "x"}, {"group_by": "file"}):
                response = await http.get("/api/v1/debug/memory", params=bad)
                assert response.status_code == 400 and response.json()["error"].startswith("invalid_")
            by_stack = await http.get("/api/v1/debug/memory", params={"group_by": "traceback"})
            assert by_stack.status_code == 200


# -- sessions leave nothing behind in reference cycles ----------------------------------------------


class _FailingAsr:
    """Every transcription fails: the speculative path stores the error, the turn re-raises it."""

    def __init__(self) -> None:
        self.calls = 0

    async def transcribe(self, audio: bytes, *, language: str | None = None) -> object:
        self.calls += 1
        await trio.sleep(0.01)
        raise AsrError("the test's ASR always fails")

    async def warm_up(self) -> None:
        return None

    def health(self) -> dict[str, object]:
        return {"status": "ok"}


def _ours_in_cycles() -> collections.Counter[str]:
    """Objects of the project that only the cycle collector would free, by type."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                                   if type(o).__module__.startswith("voicegrow."))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def test_ended_sessions_and_failed_turns_are_freed_without_the_cycle_collector(
        tmp_path: Path, audio_fixtures: Path, manifest: list[dict]) -> None:
    """A session held in a reference cycle (with its last turn's audio) is freed only by a full
    collection, which a process holding a big model runs hours apart: memory grows with every
    reconnect. Native and open-xiaoai sessions, with speech whose speculative ASR fails, must be
    freed by reference counting the moment they end."""
    from bench.xiaoai_emulator import run_emulator
    from voicegrow.audio import read_wav, resample
    from voicegrow.client import open_native_client

    entry = next(e for e in manifest if e["lang"] == "en")
    samples, rate = read_wav(audio_fixtures / entry["file"])
    speech = (resample(samples, rate, 16000) if rate != 16000 else samples).astype("<i2").tobytes()
    asr = _FailingAsr()
    # English: the apology is piper's, not Kokoro's (loading Kokoro for it took past the deadline on a
    # loaded machine).
    async with running_server(make_settings(tmp_path, asr_speculative="true", asr_language="en")) as server:
        server.services.asr = asr
        gc.collect()
        gc.disable()  # from here on only reference counting frees anything
        try:
            for round_ in range(3):
                async with run_emulator(server.ws_url, serial=f"cycle-{round_ % 2}", keep_played_audio=False) as emu:
                    await emu.wait_for_request("start_recording", timeout=10)
                    await emu.stream_pcm(speech + bytes(32000), realtime=False)
                    with trio.fail_after(20):  # the turn failed with the speculation's stored error
                        while server.services.metrics.turns.labels("failed")._value.get() < round_ + 1:
                            await trio.sleep(0.05)
                async with open_native_client(server.ws_url, device_id=f"cycle-native-{round_}") as client:
                    for _ in range(5):
                        await client.send_audio(bytes(960))
                with trio.fail_after(10):
                    await server.services.registry.wait_empty()
            await trio.sleep(0.2)
            leftovers = _ours_in_cycles()
        finally:
            gc.enable()
    assert asr.calls >= 3
    assert not leftovers, f"left in reference cycles: {dict(leftovers)}"


# -- glibc's arenas (allocator retention: docs/memory.md) ---------------------------------------------

_ARENAS_PROBE = """
import sys, threading
from voicegrow.allocator import limit_arenas
from voicegrow.memprofile import arena_count
applied = limit_arenas() if sys.argv[1] == "limit" else None
barrier = threading.Barrier(9)
def allocate():
    kept = bytearray(50_000)  # under the mmap threshold: from this thread's arena
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
barrier.wait()
for thread in threads:
    thread.join()
print(applied, arena_count())
"""


def _arenas_in_a_fresh_process(mode: str, **env: str) -> tuple[str, int]:
    import os
    import subprocess
    import sys

    clean = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", _ARENAS_PROBE, mode], env={**clean, **env}, capture_output=True,
                          text=True, timeout=60, check=True)
    applied, count = done.stdout.split()
    return applied, int(count)


def test_serve_keeps_two_malloc_arenas_unless_the_environment_says_otherwise() -> None:
    """Eight threads allocating at once get eight arenas of their own from glibc (each keeping what was
    freed in it); the server's limit keeps them to two, and MALLOC_ARENA_MAX, where set, wins."""
    from voicegrow.memprofile import glibc

    if glibc() is None:
        pytest.skip("not glibc")
    unlimited = _arenas_in_a_fresh_process("none")
    assert unlimited[1] > 2, f"the probe's threads did not get arenas of their own: {unlimited}"
    assert _arenas_in_a_fresh_process("limit") == ("2", 2)
    applied, count = _arenas_in_a_fresh_process("limit", MALLOC_ARENA_MAX="4")
    assert applied == "None" and 2 < count <= 4


def test_the_cli_limits_arenas_before_serving(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``serve`` (and each worker) applies the limit before trio, and so any worker thread, starts."""
    import voicegrow.allocator
    import voicegrow.app
    import voicegrow.logsetup
    from voicegrow import cli

    calls: list[str] = []
    monkeypatch.setattr(voicegrow.allocator, "limit_arenas", lambda: calls.append("limit") or 2)

    async def fake_serve(settings: object, worker: object) -> int:
        calls.append("serve")
        return 0

    monkeypatch.setattr(voicegrow.app, "serve", fake_serve)
    monkeypatch.setattr(voicegrow.logsetup, "configure_logging", lambda *args, **kwargs: None)  # the test's logging
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    assert cli.main(["--env-file", str(tmp_path / "none.env"), "serve"]) == 0
    assert calls == ["limit", "serve"]
    calls.clear()
    assert cli.main(["--env-file", str(tmp_path / "none.env"), "config"]) == 0
    assert calls == []
