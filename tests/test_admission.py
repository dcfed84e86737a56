"""Load-aware admission: a replica whose ASR queue or CPU is past its threshold refuses new speakers with
503 + Retry-After, keeps the ones it has, and admits again once the load has passed."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from tests.conftest import make_settings
from tests.test_asr import GatedEngine, pcm_tag
from voicegrow.app import running_server
from voicegrow.pipeline.asr import BATCH, AsrService
from voicegrow.client import ConnectFailed, open_native_client
from voicegrow.metrics import Metrics
from voicegrow.protocol import native as wire
from voicegrow.sessions.load import LoadMonitor, usable_cores


def _settings(**changes: float) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{"admit_max_asr_wait_s": 0.0, "admit_max_cpu": 0.0, "admit_retry_after_s": 5,
                                    **changes})


class _Clocks:
    def __init__(self) -> None:
        self.wall = self.cpu = 0.0


def test_cpu_is_the_share_of_usable_cores_over_the_last_seconds() -> None:
    clocks, metrics = _Clocks(), Metrics()
    asr = types.SimpleNamespace(queue_wait_s=lambda: 0.0)
    monitor = LoadMonitor(_settings(admit_max_cpu=0.8), asr, metrics, cores=2.0,
                          cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall)
    monitor.sample()
    for _ in range(5):  # 1.8 cores busy of 2: 90 %
        clocks.wall += 1.0
        clocks.cpu += 1.8
        monitor.sample()
    assert monitor.cpu == pytest.approx(0.9)
    assert monitor.refusal() == "overloaded: CPU at 90% of 2 cores"
    for _ in range(10):  # then 0.2 cores: the old readings leave the window
        clocks.wall += 1.0
        clocks.cpu += 0.2
        monitor.sample()
    assert monitor.cpu == pytest.approx(0.1)
    assert monitor.refusal() is None
    sample = metrics.registry.get_sample_value
    assert sample("voicegrow_admission_threshold", {"check": "cpu"}) == 0.8
    assert sample("voicegrow_admission_load", {"check": "cpu"}) == pytest.approx(0.1)
    off = LoadMonitor(_settings(), asr, Metrics(), cores=2.0, cpu_clock=lambda: clocks.cpu,
                      wall_clock=lambda: clocks.wall)
    off.cpu = 1.0
    assert off.refusal() is None  # 0: the check is off


def test_usable_cores_honours_a_container_cpu_quota(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("50000 100000\n")
    assert usable_cores(quota) == 0.5
    quota.write_text("max 100000\n")
    assert usable_cores(quota) >= 1
    assert usable_cores(tmp_path / "absent") >= 1


async def test_asr_queue_wait_counts_live_utterances_only() -> None:
    engine = GatedEngine()
    service = AsrService(engine, workers=1, timeout_s=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.transcribe, pcm_tag(1))
        await trio.to_thread.run_sync(engine.entered.wait)
        nursery.start_soon(lambda: service.transcribe(pcm_tag(2), priority=BATCH))
        await trio.testing.wait_all_tasks_blocked()
        # What the first utterance waited for its thread stays the reading; the upload adds nothing to it.
        first = service.queue_wait_s()
        await trio.sleep(0.2)
        assert service.queue_depth == 1 and service.queue_wait_s() == first
        nursery.start_soon(service.transcribe, pcm_tag(3))
        with trio.fail_after(10):
            while service.queue_wait_s() <= first + 0.05:
                await trio.sleep(0.01)
        engine.gate.set()
    # Taken up: its wait is still what the next speaker should expect, for a few seconds.
    assert service.queue_depth == 0 and service.queue_wait_s() > first + 0.05


async def test_an_overloaded_replica_refuses_new_speakers_with_503_and_retry_after(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, admit_max_asr_wait_s=0.05, admit_retry_after_s=7)
    async with running_server(settings) as server:
        services = server.services
        engine = GatedEngine()
        services.asr = AsrService(engine, workers=1, timeout_s=60, metrics=services.metrics)
        services.load = LoadMonitor(settings, services.asr, services.metrics)
        async with open_native_client(server.ws_url, device_id="admitted") as admitted, \
                trio.open_nursery() as nursery:
            nursery.start_soon(services.asr.transcribe, np.zeros(1600, np.int16))
            await trio.to_thread.run_sync(engine.entered.wait)
            nursery.start_soon(services.asr.transcribe, np.zeros(1600, np.int16))  # waits behind it
            with trio.fail_after(20):
                while True:
                    try:
                        async with open_websocket_url(server.ws_url):
                            pass
                    except ConnectionRejected as exc:
                        refused = exc
                        break
                    await trio.sleep(0.05)
            assert refused.status_code == 503
            assert dict(refused.headers)[b"retry-after"] == b"7"
            assert b"overloaded" in refused.body
            assert services.metrics.limit_hits.labels("overloaded")._value.get() >= 1
            sample = services.metrics.registry.get_sample_value
            assert sample("voicegrow_admission_threshold", {"check": "asr_wait_s"}) == 0.05
            assert sample("voicegrow_admission_load", {"check": "asr_wait_s"}) > 0.05
            await admitted.send(wire.Ping(nonce=7))  # the speaker already here is served as before
            with trio.fail_after(10):
                while not isinstance(await admitted.next_frame(), wire.Pong):
                    pass
            engine.gate.set()
        with trio.fail_after(30):  # the queue drained: admitted again once its last wait is past
            while True:
                try:
                    async with open_native_client(server.ws_url, device_id="later"):
                        break
                except ConnectFailed:  # refused while the drained queue's last wait is still recent
                    await trio.sleep(0.2)
