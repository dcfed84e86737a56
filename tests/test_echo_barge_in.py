"""A speaker that hears itself (issue 13): echo-safe barge-in, both protocols, one server.

The room: the device's playback back into its microphone at −6 dB, 250 ms late, with reverb and a
fan's noise (bench/acoustics.py). The replies are fixture speech (the fake TTS speaks a sentence
with the fixture clip that says it), so the echo is a voice the VAD hears as speech, as in a room.

For each protocol (a native speaker, an open-xiaoai speaker), one session:

* ten consecutive replies of ≥ 4 s each (announcements, no ASR needed) play to the end: no
  ``stop_play``, no aborted ``tts_stop``, no LLM request for the speaker's own voice;
* ten trials of a user (a fixture clip at the echo's level) talking over a reply: the reply stops
  within 800 ms of the speech onset in at least 9 of them, and that utterance's transcript, sent to
  the LLM, has CER ≤ 0.25.

Latency is counted in microphone samples from the speech onset to the stop's arrival at the device
(both positions in the device's own audio stream), so a loaded machine does not inflate it.

The whole scenario (server, fake AI, the speaker and its room) runs on a virtual clock
(the ``virtual_clock`` fixture): the speaker's microphone and playout, the pacer and every timeout keep
their real-time relations, but time stands still while anything computes (the event loop, or ASR in
a worker thread), and jumps to the next timer when everything waits. So the canceller sees its
reference exactly where the device played it, as on a machine with time to spare, whatever the
load; and the test takes seconds of CPU instead of minutes of wall time. A device whose playout
starts later after some replies than others (network jitter) is ``python -m bench echo --jitter-ms``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from bench.acoustics import EchoPath, active_rms, load_fixture_clips
from bench.fake_ai import FakeAiConfig
from bench.native_speaker import open_room_speaker
from bench.xiaoai_emulator import run_emulator
from tests.test_pipeline_e2e import _server_with_fake_ai
from voicegrow.textmetrics import char_error_rate

pytestmark = pytest.mark.slow

RATE = 16000
#: en-05 + en-04: 4.2 s of fixture speech.
REPLY = "Tell me a joke. What is one plus one?"
REPLY_MIN_S = 4.0
ROOM = EchoPath(delay_ms=250, gain_db=-6, rt60_s=0.25, noise="fan", noise_dbfs=-55, seed=13)
USER_IDS = ("en-00", "zh-00", "en-01", "zh-01", "en-02", "zh-02", "en-03", "zh-03", "en-06", "en-07")
TRIALS = len(USER_IDS)
STOP_WITHIN_S = 0.8


#: Loopback I/O between the in-process server and speaker is readable as soon as it is sent: the
#: clock may jump after this much real idle time (seconds; each jump costs one such wait).
_AUTOJUMP_S = 0.0005


@pytest.fixture
def virtual_clock(monkeypatch: pytest.MonkeyPatch) -> trio.testing.MockClock:
    """The test's trio clock (pytest-trio runs a test on its Clock fixture): it jumps to the next timer
    when every task waits, except while a worker thread (ASR, the state store) computes: then it
    stands still, as if the work took no time."""
    clock = trio.testing.MockClock(rate=0.0, autojump_threshold=_AUTOJUMP_S)
    run_sync = trio.to_thread.run_sync
    busy = [0]

    async def counted(*args: Any, **kwargs: Any) -> Any:
        busy[0] += 1
        clock.autojump_threshold = math.inf
        try:
            return await run_sync(*args, **kwargs)
        finally:
            busy[0] -= 1
            if not busy[0]:
                clock.autojump_threshold = _AUTOJUMP_S

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return clock


def _onset(samples: np.ndarray) -> int:
    """The clip's speech onset: its first 10 ms frame within 30 dB of its loudest."""
    frames = samples[: samples.size // 160 * 160].reshape(-1, 160)
    energy = np.mean(frames.astype(np.float64) ** 2, axis=1)
    return int(np.argmax(energy >= energy.max() * 1e-3)) * 160


def _echo_level_dbfs(audio_fixtures: Path) -> float:
    """The echo's speech level at the microphone: the reply clips' level plus the path's gain."""
    clips = {e["text"]: c for e, c in load_fixture_clips(audio_fixtures, lang="en")}
    reply = np.concatenate([clips["Tell me a joke."], clips["What is one plus one?"]])
    return 20 * np.log10(active_rms(reply)) + ROOM.gain_db


def _turns(server: Any, outcome: str) -> float:
    return server.services.metrics.registry.get_sample_value("voicegrow_turns_total", {"outcome": outcome}) or 0.0


async def _poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


class _Device:
    """What the scenario needs from either protocol's speaker."""

    def __init__(self, server: Any, device_id: str) -> None:
        self.server = server
        self.device_id = device_id

    def info(self) -> Any:
        found = [s for s in self.server.services.registry if s.device_id == self.device_id and s.announce]
        return found[0] if found else None

    def state(self) -> str:
        info = self.info()
        return info.state_of() if info is not None and info.state_of else "handshake"

    def position(self) -> int:  # microphone samples sent
        raise NotImplementedError

    def stops(self) -> list[int]:  # microphone positions at which the device was told to stop playing
        raise NotImplementedError

    def talk(self, clip: np.ndarray, dbfs: float) -> int:
        raise NotImplementedError


class _Native(_Device):
    def __init__(self, server: Any, speaker: Any) -> None:
        super().__init__(server, "echo-native")
        self.speaker = speaker

    def position(self) -> int:
        return self.speaker.mic_samples_sent

    def stops(self) -> list[int]:
        return [e.position for e in self.speaker.events_named("tts_stop") if e.data.get("reason") == "aborted"]

    def talk(self, clip: np.ndarray, dbfs: float) -> int:
        return self.speaker.talk(clip, dbfs=dbfs)


class _Xiaoai(_Device):
    def __init__(self, server: Any, emulator: Any) -> None:
        super().__init__(server, "xiaoai-echo-1")
        self.emulator = emulator

    def position(self) -> int:
        return self.emulator.mic_samples_sent

    def stops(self) -> list[int]:
        return [position for command, position in self.emulator.request_positions if command == "stop_play"]

    def talk(self, clip: np.ndarray, dbfs: float) -> int:
        from bench.acoustics import scale_to_dbfs

        at = self.emulator.user_onset()
        pcm = np.clip(np.rint(scale_to_dbfs(clip, dbfs, active=True) * 32768), -32768, 32767)
        self.emulator._mic += pcm.astype("<i2").tobytes()  # streamed by the recorder from the next frame
        return at


async def _ten_replies(device: _Device) -> list[str]:
    """Ten announcements of ≥ 4 s one after the other; returns what went wrong (nothing, we hope)."""
    problems: list[str] = []
    await _poll(lambda: device.info() is not None and device.position() > RATE, 30, "the session")
    for index in range(10):
        stops_before = len(device.stops())
        await device.info().announce(REPLY, "en", {})
        await _poll(lambda: device.state() == "speaking", 30, f"reply {index} to play")
        await _poll(lambda: device.state() in ("listening", "hearing"), 60, f"reply {index} to end")
        if len(device.stops()) != stops_before:
            problems.append(f"{device.device_id}: reply {index} was stopped")
    return problems


async def _talk_over(device: _Device, ai: Any, users: list[tuple[dict, np.ndarray]], level: float,
                     results: list[dict]) -> None:
    """Trials of a user talking over a reply; each interrupting utterance's answer is the next reply."""
    for entry, clip in users:
        if device.state() not in ("speaking",):
            # Not while the last user is still heard: a preemptive reply sends their transcript to
            # the LLM before the utterance ends, and a reply announced now would be barged into.
            await _poll(lambda: device.state() in ("listening", "speaking"), 60, "the device idle")
            if device.state() != "speaking":
                await device.info().announce(REPLY, "en", {})
        await _poll(lambda: device.state() == "speaking", 60, "a reply to talk over")
        start = device.position()
        await _poll(lambda: device.position() >= start + RATE, 30, "a second of the reply")
        heard_before = len([r for r in ai.requests if r["path"].endswith("/chat/completions")])
        stops_before = len(device.stops())
        onset = device.talk(clip, level) + _onset(clip)
        result: dict[str, Any] = {"device": device.device_id, "clip": entry["id"], "latency_s": None, "cer": None}
        with trio.move_on_after(30):
            await _poll(lambda: len(device.stops()) > stops_before, 30, "the stop")
            result["latency_s"] = (device.stops()[stops_before] - onset) / RATE
        with trio.move_on_after(60):
            await _poll(lambda: len([r for r in ai.requests if r["path"].endswith("/chat/completions")])
                        > heard_before, 60, "the transcript")
            request = [r for r in ai.requests if r["path"].endswith("/chat/completions")][heard_before]
            messages = request["body"]["messages"]
            heard = messages[-1]["content"]
            result["transcript"] = heard
            result["cer"] = char_error_rate(entry["text"], heard, entry["lang"])
            # The history keeps only what was played before each interruption: the reply's second
            # sentence never played (the user spoke a second into the first), so it is not there.
            result["history_ok"] = not any(m["role"] == "assistant" and "one plus one" in m["content"]
                                           for m in messages[:-1])
        results.append(result)


@contextlib.asynccontextmanager
async def _device(protocol: str, server: Any) -> AsyncIterator[_Device]:
    url = server.ws_url
    if protocol == "native":
        async with open_room_speaker(url, ROOM, device_id="echo-native") as speaker:
            yield _Native(server, speaker)
    else:
        async with run_emulator(url, serial="echo-1", room=ROOM) as emulator:
            await emulator.wait_for_request("start_play", timeout=30)
            yield _Xiaoai(server, emulator)


@pytest.mark.parametrize("protocol", ["native", "xiaoai"])
async def test_a_speaker_hearing_itself_neither_interrupts_itself_nor_ignores_the_user(
        tmp_path, audio_fixtures, manifest, protocol, virtual_clock) -> None:
    fake = FakeAiConfig(ttft_ms=100, tokens_per_s=80, reply=REPLY, tts_clips_dir=str(audio_fixtures))
    level = _echo_level_dbfs(audio_fixtures)
    clips = {e["id"]: (e, c) for e, c in load_fixture_clips(audio_fixtures)}
    users = [clips[i] for i in USER_IDS]
    async with _server_with_fake_ai(tmp_path, fake, barge_in="auto", asr_timeout=120) as (server, ai):
        async with _device(protocol, server) as device:
            interrupted_before = _turns(server, "interrupted")
            with trio.fail_after(240):
                problems = await _ten_replies(device)
            assert problems == []
            assert not device.stops()
            if isinstance(device, _Native):
                stops = device.speaker.events_named("tts_stop")
                assert all(e.data.get("reason") == "done" for e in stops), stops
                played = sorted(device.speaker.played_s.values())
                assert len([s for s in played if s >= REPLY_MIN_S]) == 10, played
            else:
                assert device.emulator.played_bytes / 48000 >= 10 * REPLY_MIN_S
            assert _turns(server, "interrupted") == interrupted_before
            assert not [r for r in ai.requests if r["path"].endswith("/chat/completions")]  # no self-talk

            results: list[dict] = []
            with trio.fail_after(300):
                await _talk_over(device, ai, users, level, results)
    good = [r for r in results if r["latency_s"] is not None and 0 <= r["latency_s"] <= STOP_WITHIN_S
            and r["cer"] is not None and r["cer"] <= 0.25]
    assert len(results) == TRIALS
    assert len(good) >= 9, results
    assert all(r.get("history_ok", True) for r in results), results
