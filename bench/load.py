"""``python -m bench load``: how many speakers one server process holds.

Each step connects that many simulated speakers at once — native and open-xiaoai mixed — streaming
their microphones in real time: silence mostly, and now and then a fixture clip, after which a
speaker waits for the reply before it talks again. Per step the server's CPU use and memory, the
frame-ingest lag (from its own histogram, the change over the step), dropped frames, completed turns
and the turn latency the speakers saw; and the answer to the question: the largest step at which
ingest lag p99 stays under 50 ms.

Utterances trigger ASR, which on two cores serves a few per second: with many speakers the ASR queue
grows and so does turn latency. That is the finding, not a fault of the harness; what must not grow
is the ingest lag, since a server that reads audio late hears barge-ins and ends of speech late.

The server runs as a subprocess by default (``voicegrow serve`` with the fake AI in a subprocess too),
so the load generator's Python does not compete with the server's for one interpreter and its lag
figures are the server's own; ``--in-process`` puts all of it in one process.

``--asr-process`` puts speech recognition on a second process, as the scale file's edge replicas and
ASR pool do: a ``SERVER_ROLE=asr`` server, and the measured server (the *edge*) with ``ASR_BASE_URL``
pointing at it. The server CPU is then the edge's alone (sockets, VAD, pacing, the LLM and TTS
clients), and the pool's is reported beside it. ``--talker-share 0`` makes every speaker stream silence
only; run it once with 0 and once with 1 to split an edge's CPU into streaming and talking.

The simulated speakers (:class:`Crowd`) are shared with ``bench soak``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import math
import random
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from bench.common import (
    BenchError,
    Clip,
    FakeAiKnobs,
    MetricsSnapshot,
    ProcessSample,
    ServerUnderTest,
    add_common_options,
    assumed_settings,
    beyond_last_bucket,
    clip_pcm,
    fmt,
    histogram_quantile,
    locate_speech,
    markdown_table,
    own_cpu_s,
    parse_overrides,
    percentiles,
    progress,
    pyplot,
    run_command,
    save_figure,
    server_under_test,
)

__all__ = ["Behaviour", "Crowd", "CrowdStats", "LagHistogram", "Utterance", "add_crowd_options", "add_server_options",
           "main", "prepare_utterances", "process_usage", "run_step", "server_figures", "wait_until_idle"]

SAMPLE_RATE = 16_000
VAD_ALIGN_SAMPLES = 480  # utterances start on the server VAD's 30 ms grid, where the replay is exact
XIAOAI_FRAME_SAMPLES = 1440
LAG_TARGET_S = 0.050


# -- what the speakers say ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Utterance:
    """A clip, loaded once and shared by every speaker, with where the server's VAD ends its speech."""

    clip_id: str
    pcm: bytes
    speech_end_s: float


def prepare_utterances(clips: Sequence[Clip], settings: Any) -> list[Utterance]:
    """The clips the VAD cuts into exactly one utterance (others would confuse turn matching)."""
    out = []
    for clip in clips:
        pcm = clip_pcm(clip)
        span = locate_speech(pcm, settings, chunk_bytes=2 * VAD_ALIGN_SAMPLES)
        if span is not None and span.utterances == 1:
            out.append(Utterance(clip.id, pcm, span.end_s))
    if not out:
        raise BenchError("no_clips", "no clip makes exactly one utterance for the server's VAD")
    return out


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """How the simulated speakers talk. Ranges are uniform (low, high) in seconds."""

    first_delay_s: tuple[float, float] = (0.5, 6.0)
    gap_s: tuple[float, float] = (4.0, 12.0)
    barge_in: float = 0.0  # chance of talking over a reply once it is heard
    barge_in_after_s: tuple[float, float] = (0.3, 1.0)
    reconnect: float = 0.0  # chance of hanging up and reconnecting after a turn
    #: Hang up and dial again after this long connected (at the next moment no question is pending);
    #: None: only ``reconnect`` ends a connection.
    reconnect_after_s: tuple[float, float] | None = None
    #: Share of the speakers (of each protocol) that ask questions; the others stream silence only.
    talker_share: float = 1.0
    reply_timeout_s: float = 30.0
    xiaoai_share: float = 0.5
    xiaozhi_share: float = 0.0  # of all speakers, before the open-xiaoai share of the rest
    ping_interval_s: float = 2.0


# -- what they saw --------------------------------------------------------------------------------------------


class LagHistogram:
    """Counts of lateness in fixed buckets: constant memory however long the run (the soak runs for hours)."""

    BOUNDS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, math.inf)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BOUNDS_S)
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        for index, bound in enumerate(self.BOUNDS_S):
            if seconds <= bound:
                self.counts[index] += 1
                break
        self.max_s = max(self.max_s, seconds)

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, list(zip(self.BOUNDS_S, itertools.accumulate(self.counts))))

    @property
    def total(self) -> int:
        return sum(self.counts)


@dataclasses.dataclass
class CrowdStats:
    """What the speakers saw since the last :meth:`Crowd.take_stats` (one load step, one soak sample)."""

    connects: int = 0
    connect_failures: int = 0
    dropped_connections: int = 0
    reconnects: int = 0
    utterances: int = 0
    replies: int = 0
    no_reply: int = 0
    barge_ins: int = 0
    latencies_s: list[float] = dataclasses.field(default_factory=list)
    ping_rtts_s: list[float] = dataclasses.field(default_factory=list)
    send_lateness: LagHistogram = dataclasses.field(default_factory=LagHistogram)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        key = type(exc).__name__
        self.errors[key] = self.errors.get(key, 0) + 1

    def figures(self) -> dict[str, Any]:
        return {
            "connects": self.connects, "connect_failures": self.connect_failures,
            "dropped_connections": self.dropped_connections, "reconnects": self.reconnects,
            "utterances": self.utterances, "replies": self.replies, "no_reply": self.no_reply,
            "barge_ins": self.barge_ins, "turn_latency_s": percentiles(self.latencies_s),
            "ping_rtt_s": percentiles(self.ping_rtts_s),
            "send_lateness_p99_s": self.send_lateness.quantile(0.99), "send_lateness_max_s": self.send_lateness.max_s,
            "frames_sent_native": self.send_lateness.total, "errors": dict(self.errors),
        }


class _Conversation:
    """One speaker's side of the conversation: when to talk, which turn answers it, what that cost.

    Both protocols share it; their drivers feed it what they observe. Protocol-free on purpose: the
    same decisions (talk, wait, barge in, hang up) make the two kinds of speaker comparable.
    """

    def __init__(self, crowd: Crowd, rng: random.Random, *, talker: bool = True) -> None:
        self.crowd = crowd
        self.rng = rng
        self.talker = talker
        self.next_at = trio.current_time() + rng.uniform(*crowd.behaviour.first_delay_s) if talker else math.inf
        self.hang_up_at = math.inf
        self.awaiting = False
        self.heard = False
        self.turn_id: int | None = None
        self.speech_end_at = 0.0
        self.hang_up = False

    def ready(self, now: float) -> bool:
        return not self.awaiting and now >= self.next_at

    def connected(self, now: float) -> None:
        """A new connection is up: when this one is to be hung up (``Behaviour.reconnect_after_s``)."""
        self.hang_up = False
        after = self.crowd.behaviour.reconnect_after_s
        self.hang_up_at = now + self.rng.uniform(*after) if after else math.inf

    def check_hang_up(self, now: float) -> None:
        """Time to hang up, unless a question waits for its answer (it would go unanswered)."""
        if not self.awaiting and now >= self.hang_up_at:
            self.hang_up = True

    def wake_at(self) -> float:
        """The next moment this speaker acts by itself: talk, or hang up."""
        return min(self.next_at, self.hang_up_at)

    def spoke(self, speech_end_at: float) -> None:
        self.crowd.stats.utterances += 1
        self.awaiting, self.heard, self.turn_id = True, False, None
        self.speech_end_at = speech_end_at

    def adopt(self, turn_id: int) -> None:
        if self.awaiting and self.turn_id is None:
            self.turn_id = turn_id

    def reply_audio(self, now: float, turn_id: int | None = None) -> None:
        if not self.awaiting or self.heard or (turn_id is not None and turn_id != self.turn_id):
            return
        self.heard = True
        stats, behaviour = self.crowd.stats, self.crowd.behaviour
        stats.replies += 1
        stats.latencies_s.append(now - self.speech_end_at)
        if self.rng.random() < behaviour.barge_in:
            stats.barge_ins += 1
            self.awaiting = False
            self.next_at = now + self.rng.uniform(*behaviour.barge_in_after_s)

    def turn_over(self, now: float, turn_id: int | None = None) -> None:
        if not self.awaiting or (turn_id is not None and turn_id != self.turn_id):
            return
        if not self.heard:
            self.crowd.stats.no_reply += 1
        self._next_turn(now)

    def check_timeout(self, now: float) -> None:
        if self.awaiting and now - self.speech_end_at > self.crowd.behaviour.reply_timeout_s:
            self.crowd.stats.no_reply += 1
            self._next_turn(now)

    def _next_turn(self, now: float) -> None:
        self.awaiting = False
        self.next_at = now + self.rng.uniform(*self.crowd.behaviour.gap_s)
        if self.rng.random() < self.crowd.behaviour.reconnect:
            self.hang_up = True


# -- the speakers ----------------------------------------------------------------------------------------------


class Crowd:
    """Simulated speakers against one server. Start them with :meth:`populate` inside a nursery.

    A speaker is a couple of trio tasks on one WebSocket, reusing the pre-loaded clips; a native one
    sends 20, 30 or 40 ms frames, an open-xiaoai one is a :mod:`bench.xiaoai_emulator` speaker
    (1440-sample frames every 90 ms). Every connection gets a fresh emulator, so nothing a speaker
    heard outlives its connection (the soak must see the server's memory, not ours).
    """

    def __init__(self, url: str, utterances: Sequence[Utterance], behaviour: Behaviour, *, seed: int = 1,
                 xiaoai: bool = True, addresses: int = 1) -> None:
        """``addresses`` > 1: speaker ``i`` dials from 127.0.0.(2 + i mod addresses), a fleet of homes
        as the server sees it (the server must listen on loopback)."""
        self.url = url
        self.addresses = addresses
        self.utterances = list(utterances)
        self.behaviour = behaviour
        self.seed = seed
        self.xiaoai = xiaoai
        self.run_id = uuid.uuid4().hex[:8]
        self.stats = CrowdStats()
        self.connected = {"native": 0, "xiaoai": 0, "xiaozhi": 0}
        self._started = 0

    def take_stats(self) -> CrowdStats:
        """The figures so far, and a fresh page for the next window."""
        stats, self.stats = self.stats, CrowdStats()
        return stats

    def protocol_of(self, index: int) -> str:
        zshare = self.behaviour.xiaozhi_share
        if _picked(index, zshare):
            return "xiaozhi"
        share = self.behaviour.xiaoai_share if self.xiaoai else 0.0
        return "xiaoai" if _picked(index, share) else "native"

    def talks(self, index: int) -> bool:
        """Whether speaker ``index`` asks questions: ``talker_share`` of each protocol's speakers."""
        protocol = self.protocol_of(index)
        rank = sum(1 for i in range(index) if self.protocol_of(i) == protocol)
        return _picked(rank, self.behaviour.talker_share)

    def source_address(self, index: int) -> str | None:
        return f"127.0.0.{2 + index % self.addresses}" if self.addresses > 1 else None

    async def populate(self, nursery: trio.Nursery, count: int, *, ramp_s: float, connect_timeout_s: float = 60.0) -> int:
        """Start ``count`` more speakers over ``ramp_s``; returns once they are connected (or the timeout)."""
        first = self._started
        for index in range(first, first + count):
            speaker = {"xiaoai": self._xiaoai_speaker, "xiaozhi": self._xiaozhi_speaker,
                       "native": self._native_speaker}[self.protocol_of(index)]
            nursery.start_soon(self._guarded, speaker, index, random.Random(self.seed * 1_000_003 + index))
            self._started += 1
            await trio.sleep(ramp_s / max(count, 1))
        # Wait while connections keep coming: refused speakers keep redialling, and must not hold the run.
        deadline, last, last_change = trio.current_time() + connect_timeout_s, -1, trio.current_time()
        while (now := trio.current_time()) < deadline and now - last_change < 10.0:
            connected = sum(self.connected.values())
            if connected >= self._started:
                break
            if connected != last:
                last, last_change = connected, now
            await trio.sleep(0.1)
        return sum(self.connected.values())

    async def _guarded(self, speaker: Callable[[int, random.Random], Awaitable[None]], index: int,
                       rng: random.Random) -> None:
        """A speaker that fails past its own redialling is counted and gone; it must not end the run.

        (A 30-minute soak once lost every sample to one open-xiaoai speaker whose ``TooSlowError``
        escaped as the run was ending.)"""
        try:
            await speaker(index, rng)
        except Exception as exc:
            self.stats.error(exc)
            self.stats.dropped_connections += 1

    # -- native -------------------------------------------------------------------------------------------

    async def _native_speaker(self, index: int, rng: random.Random) -> None:
        from voicegrow.client import open_native_client

        talk = _Conversation(self, rng, talker=self.talks(index))
        frame_ms = rng.choice((20, 30, 40))
        while True:
            try:
                async with open_native_client(self.url, device_id=f"bench-{self.run_id}-{index}",
                                              connect_timeout_s=30,
                                              local_address=self.source_address(index)) as client:
                    self.stats.connects += 1
                    self.connected["native"] += 1
                    talk.connected(trio.current_time())
                    pings: dict[int, float] = {}  # nonce -> when sent
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._native_receiver, client, talk, pings)
                            await self._native_microphone(client, talk, frame_ms, rng, pings)
                            nursery.cancel_scope.cancel()
                    finally:
                        self.connected["native"] -= 1
            except Exception as exc:  # a speaker's failure is a figure of the run (counted), never its end
                self._lost(exc, talk)
                await trio.sleep(1.0)
            self._redial(talk)

    def _lost(self, exc: BaseException, talk: _Conversation) -> None:
        from bench.xiaoai_emulator import EmulatorError
        from voicegrow.client import ConnectFailed, HandshakeFailed

        while len(getattr(exc, "exceptions", ())) == 1:
            exc = exc.exceptions[0]  # type: ignore[attr-defined]  # nurseries wrap what their bodies raise
        if isinstance(exc, (ConnectFailed, HandshakeFailed, EmulatorError)):
            self.stats.connect_failures += 1
        else:
            self.stats.dropped_connections += 1
        self.stats.error(exc)
        talk.hang_up = True

    def _redial(self, talk: _Conversation) -> None:
        talk.hang_up = False
        talk.awaiting = False  # a turn of the old connection will not answer on the new one
        self.stats.reconnects += 1

    async def _native_microphone(self, client: Any, talk: _Conversation, frame_ms: int, rng: random.Random,
                                 pings: dict[int, float]) -> None:
        """Real-time frames: frame [a, b) goes out at ``t0 + b``, when a microphone would have it."""
        from voicegrow.client import ConnectionClosed
        from voicegrow.protocol import Ping

        frame_samples = SAMPLE_RATE * frame_ms // 1000
        silence = bytes(2 * frame_samples)
        t0 = trio.current_time()
        position = 0
        speaking: Utterance | None = None
        spoken = 0
        next_ping = t0 + rng.uniform(0, self.behaviour.ping_interval_s)
        while not talk.hang_up:
            due = t0 + (position + frame_samples) / SAMPLE_RATE
            await trio.sleep_until(due)
            now = trio.current_time()
            self.stats.send_lateness.add(now - due)
            talk.check_timeout(now)
            talk.check_hang_up(now)
            if speaking is None and talk.ready(now) and position % VAD_ALIGN_SAMPLES == 0:
                speaking, spoken = rng.choice(self.utterances), 0
                talk.spoke(t0 + position / SAMPLE_RATE + speaking.speech_end_s)
            frame = silence
            if speaking is not None:
                frame = speaking.pcm[spoken:spoken + len(silence)]
                spoken += len(frame)
                if spoken >= len(speaking.pcm):
                    speaking = None
                frame += silence[len(frame):]
            try:
                await client.send_audio(frame)
                if now >= next_ping:
                    nonce = rng.getrandbits(31)
                    pings[nonce] = now
                    await client.send(Ping(nonce))
                    next_ping = now + self.behaviour.ping_interval_s
            except ConnectionClosed as exc:
                self._lost(exc, talk)
                return
            position += frame_samples

    async def _native_receiver(self, client: Any, talk: _Conversation, pings: dict[int, float]) -> None:
        from voicegrow.client import ConnectionClosed
        from voicegrow.protocol import Audio, Control, Pong

        try:
            while True:
                frame = await client.next_frame()
                now = trio.current_time()
                if isinstance(frame, Audio):
                    if frame.pcm:
                        talk.reply_audio(now, frame.turn_id)
                elif isinstance(frame, Control):
                    if frame.event == "asr_final":
                        talk.adopt(frame.turn_id)
                    elif frame.event == "turn_end":
                        talk.turn_over(now, frame.turn_id)
                elif isinstance(frame, Pong):
                    sent = pings.pop(frame.nonce, None)
                    if sent is not None:
                        self.stats.ping_rtts_s.append(now - sent)
        except ConnectionClosed as exc:
            self._lost(exc, talk)

    # -- open-xiaoai ----------------------------------------------------------------------------------------

    async def _xiaoai_speaker(self, index: int, rng: random.Random) -> None:
        from bench.xiaoai_emulator import run_emulator

        talk = _Conversation(self, rng, talker=self.talks(index))

        async def converse(emu: Any) -> None:
            await emu.wait_for_request("start_recording", timeout=30)
            talk.connected(trio.current_time())
            await self._xiaoai_conversation(emu, talk, rng)

        # The speakers here never listen to what they played: count it, keep none of it.
        await self._keep_dialling("xiaoai", talk, lambda: run_emulator(
            self.url, serial=f"bench-{self.run_id}-{index}", connect_timeout=30, keep_played_audio=False,
            source_address=self.source_address(index)), converse)

    async def _keep_dialling(self, protocol: str, talk: _Conversation, connect: Callable[[], Any],
                             converse: Callable[[Any], Awaitable[None]]) -> None:
        """Connect (``connect()`` is an async context manager), converse, and after a loss dial again;
        counted as for native speakers."""
        while True:
            try:
                async with connect() as device:
                    self.stats.connects += 1
                    self.connected[protocol] += 1
                    try:
                        await converse(device)
                    finally:
                        self.connected[protocol] -= 1
            except Exception as exc:
                self._lost(exc, talk)
                await trio.sleep(1.0)
            self._redial(talk)

    async def _xiaoai_conversation(self, emu: Any, talk: _Conversation, rng: random.Random) -> None:
        frame_bytes = 2 * XIAOAI_FRAME_SAMPLES
        while not talk.hang_up:
            await trio.sleep_until(talk.wake_at())
            talk.check_hang_up(trio.current_time())
            if talk.hang_up:
                return
            if not emu.connected:
                self.stats.dropped_connections += 1
                return
            utterance = rng.choice(self.utterances)
            sent = await emu.stream_pcm(utterance.pcm, realtime=True)
            if sent < len(utterance.pcm):
                self.stats.dropped_connections += 1
                return
            emu.play_frames.clear()  # a reply talked over has been cut by now; only this turn's counts
            emu.play_writes.clear()
            # The last frame (padded with silence) has just gone out; the clip started on a frame edge.
            padded_s = math.ceil(len(utterance.pcm) / frame_bytes) * frame_bytes / (2 * SAMPLE_RATE)
            talk.spoke(trio.current_time() - (padded_s - utterance.speech_end_s))
            await self._xiaoai_reply(emu, talk)

    async def _xiaoai_reply(self, emu: Any, talk: _Conversation) -> None:
        """Wait for the first play frame, then for the reply to end (no play frame for a second)."""
        timeout = self.behaviour.reply_timeout_s
        deadline = talk.speech_end_at + timeout
        with trio.move_on_at(deadline):
            while not emu.play_frames:
                await emu.wait_until(lambda e: bool(e.play_frames) or not e.connected, timeout=timeout)
                if not emu.connected:
                    return
        if not emu.play_frames:
            talk.check_timeout(trio.current_time())
            return
        talk.reply_audio(emu.play_frames[0].received_at)
        if not talk.awaiting:  # barged in: talk over the reply
            return
        with trio.move_on_at(deadline + timeout):
            while trio.current_time() - emu.play_frames[-1].received_at < 1.0 and emu.connected:
                await trio.sleep(0.2)
        talk.turn_over(trio.current_time())


    # -- xiaozhi-esp32 -----------------------------------------------------------------------------------------

    async def _xiaozhi_speaker(self, index: int, rng: random.Random) -> None:
        from bench.latency import xiaozhi_url
        from bench.xiaozhi_emulator import run_xiaozhi_emulator

        talk = _Conversation(self, rng, talker=self.talks(index))

        async def converse(board: Any) -> None:
            talk.connected(trio.current_time())
            await board.listen_start("auto")  # the live microphone streams silence from here on
            await self._xiaozhi_conversation(board, talk)

        await self._keep_dialling("xiaozhi", talk, lambda: run_xiaozhi_emulator(
            xiaozhi_url(self.url), device_id=f"bench-{self.run_id}-{index}", mcp=False, keep_played_audio=False),
            converse)

    async def _xiaozhi_conversation(self, board: Any, talk: _Conversation) -> None:
        frame_bytes = 2 * SAMPLE_RATE * 60 // 1000
        timeout = self.behaviour.reply_timeout_s
        while not talk.hang_up:
            await trio.sleep_until(talk.wake_at())
            talk.check_hang_up(trio.current_time())
            if talk.hang_up:
                return
            with trio.move_on_after(timeout):  # the microphone reopens once the last reply has been played
                await board.wait_until(lambda b: b.mic_open or not b.connected, timeout=timeout)
            if not board.connected:
                self.stats.dropped_connections += 1
                return
            utterance = talk.rng.choice(self.utterances)
            board.first_packet_at = None
            stops = board.tts_states().count("stop")
            await board.stream_pcm(utterance.pcm, realtime=True)
            padded_s = math.ceil(len(utterance.pcm) / frame_bytes) * frame_bytes / (2 * SAMPLE_RATE)
            talk.spoke(trio.current_time() - (padded_s - utterance.speech_end_s))
            deadline = talk.speech_end_at + timeout
            with trio.move_on_at(deadline):
                await board.wait_until(lambda b: b.first_packet_at is not None or not b.connected, timeout=timeout)
            if board.first_packet_at is None:
                talk.check_timeout(trio.current_time())
                continue
            talk.reply_audio(board.first_packet_at)
            with trio.move_on_at(deadline + timeout):
                await board.wait_until(lambda b: b.tts_states().count("stop") > stops or not b.connected,
                                       timeout=2 * timeout)
            talk.turn_over(trio.current_time())


def _picked(index: int, share: float) -> bool:
    """Whether item ``index`` is among a ``share`` spread evenly over a sequence (every 4th for 0.25)."""
    return int((index + 1) * share) > int(index * share)


# -- server-side figures -------------------------------------------------------------------------------------


def server_figures(before: MetricsSnapshot | None, after: MetricsSnapshot | None) -> dict[str, Any]:
    """What the server's own metrics say happened between two scrapes."""
    if before is None or after is None:
        return {"available": False}
    lag = after.bucket_delta(before, "voicegrow_ingest_lag_seconds")
    response = after.bucket_delta(before, "voicegrow_stage_latency_seconds", stage="response")

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    lag_by_protocol = {}
    for protocol in ("native", "xiaoai", "xiaozhi"):
        buckets = after.bucket_delta(before, "voicegrow_ingest_lag_seconds", protocol=protocol)
        lag_by_protocol[protocol] = {"p50_s": histogram_quantile(0.5, buckets),
                                     "p99_s": histogram_quantile(0.99, buckets),
                                     "frames": buckets[-1][1] if buckets else 0.0}
    return {
        "available": True,
        "ingest_lag_p50_s": histogram_quantile(0.5, lag),
        "ingest_lag_p99_s": histogram_quantile(0.99, lag),
        "ingest_lag_p99_beyond_histogram": beyond_last_bucket(0.99, lag),
        "ingest_lag_frames": lag[-1][1] if lag else 0.0,
        "ingest_lag_by_protocol": lag_by_protocol,
        "frames_received": delta("voicegrow_audio_frames_received_total"),
        "frames_dropped": delta("voicegrow_audio_frames_dropped_total"),
        "turns": {outcome: delta("voicegrow_turns_total", outcome=outcome)
                  for outcome in ("completed", "interrupted", "failed", "empty")},
        "response_p50_s": histogram_quantile(0.5, response),
        "response_p99_s": histogram_quantile(0.99, response),
        "asr_requests": {outcome: delta("voicegrow_asr_requests_total", outcome=outcome)
                         for outcome in ("success", "empty", "timeout", "error")},
    }


def process_usage(before: ProcessSample | None, after: ProcessSample | None) -> dict[str, Any]:
    if before is None or after is None:
        return {"cpu_cores": None, "rss_mb": None}
    wall = max(after.at - before.at, 1e-9)
    return {"cpu_cores": (after.cpu_s - before.cpu_s) / wall, "rss_mb": after.rss_bytes / 2**20,
            "fds": after.fds, "threads": after.threads}


# -- the sweep --------------------------------------------------------------------------------------------------


async def run_step(server: ServerUnderTest, utterances: Sequence[Utterance], behaviour: Behaviour, count: int,
                   duration_s: float, *, seed: int, xiaoai: bool, bar: Any,
                   pool: ServerUnderTest | None = None) -> dict[str, Any]:
    """One step: ``count`` speakers for ``duration_s`` after they are all connected, then hang up.
    ``pool``: the ASR process the server sends its utterances to, whose CPU is measured alongside."""
    crowd = Crowd(server.ws_url, utterances, behaviour, seed=seed, xiaoai=xiaoai)
    queue_max = 0.0
    rss_max = 0
    async with trio.open_nursery() as nursery:
        connected = await crowd.populate(nursery, count, ramp_s=min(5.0, 0.025 * count))
        ramp = crowd.take_stats()  # the ramp is not part of the step, but a refused connection matters
        metrics_before, process_before, own_before = await server.metrics(), server.process(), own_cpu_s()
        pool_before = pool.process() if pool is not None else None
        wall_before = trio.current_time()
        deadline = wall_before + duration_s
        while trio.current_time() < deadline:
            await trio.sleep(min(1.0, max(0.0, deadline - trio.current_time())))
            snapshot = await server.metrics()
            if snapshot is not None:
                queue_max = max(queue_max, snapshot.total("voicegrow_asr_queue_depth"))
            sample = server.process()
            if sample is not None:
                rss_max = max(rss_max, sample.rss_bytes)
            bar.update(1)
        metrics_after, process_after, own_after = await server.metrics(), server.process(), own_cpu_s()
        pool_after = pool.process() if pool is not None else None
        wall = trio.current_time() - wall_before
        stats = crowd.take_stats()
        nursery.cancel_scope.cancel()
    await wait_until_idle(server)
    figures = {
        "sessions": count,
        "connected": connected,
        "by_protocol": {p: sum(1 for i in range(count) if crowd.protocol_of(i) == p)
                        for p in ("native", "xiaoai", "xiaozhi")},
        "duration_s": wall,
        "server": server_figures(metrics_before, metrics_after),
        "process": process_usage(process_before, process_after),
        "asr_pool_process": process_usage(pool_before, pool_after) if pool is not None else None,
        "generator_cpu_cores": (own_after - own_before) / wall if server.mode != "in-process" else None,
        "rss_max_mb": rss_max / 2**20 if rss_max else None,
        "asr_queue_max": queue_max,
        "client": stats.figures(),
        "ramp_connect_failures": ramp.connect_failures,
    }
    lag_p99 = figures["server"].get("ingest_lag_p99_s")
    figures["lag_ok"] = lag_p99 is not None and lag_p99 < LAG_TARGET_S and connected == count
    return figures


async def wait_until_idle(server: ServerUnderTest, timeout_s: float = 30.0) -> None:
    """Between steps: every session gone and the ASR queue empty, so steps do not leak into each other."""
    with trio.move_on_after(timeout_s):
        while True:
            snapshot = await server.metrics()
            if snapshot is None:
                await trio.sleep(2.0)
                return
            if snapshot.total("voicegrow_sessions_active") == 0 and snapshot.total("voicegrow_asr_queue_depth") == 0:
                return
            await trio.sleep(0.25)


def largest_ok(steps: Sequence[dict[str, Any]]) -> int | None:
    """The largest session count up to which every step admitted every speaker and kept ingest lag p99
    under the target."""
    best = None
    for step in sorted(steps, key=lambda s: s["sessions"]):
        if not step["lag_ok"]:
            break
        best = step["sessions"]
    return best


#: The bench's own key between the edge and its ASR pool (API_KEYS wants 16 characters or more).
_POOL_KEY = "bench-asr-pool-key"


@contextlib.asynccontextmanager
async def asr_pool(args: argparse.Namespace) -> AsyncIterator[ServerUnderTest | None]:
    """With ``--asr-process``: a ``SERVER_ROLE=asr`` server subprocess (the model loaded), else None."""
    if not args.asr_process:
        yield None
        return
    overrides = {key: value for key, value in parse_overrides(args.set).items() if key.upper().startswith("ASR_")}
    overrides.update(SERVER_ROLE="asr", API_KEYS=_POOL_KEY, ASR_PRELOAD="true")
    async with server_under_test("subprocess", fake_ai=None, overrides=overrides) as pool:
        yield pool


async def run_load(args: argparse.Namespace, utterances_from: Sequence[Clip]) -> dict[str, Any]:
    mode = "url" if args.url else ("in-process" if args.in_process else "subprocess")
    async with contextlib.AsyncExitStack() as stack:
        pool = await stack.enter_async_context(asr_pool(args))
        overrides = parse_overrides(args.set)
        if pool is not None:
            overrides.update(ASR_BASE_URL=f"{pool.http_url}/v1", ASR_API_KEY=_POOL_KEY, ASR_PRELOAD="false")
        server = await stack.enter_async_context(server_under_test(
            mode, fake_ai=None if args.url else FakeAiKnobs.from_args(args), overrides=overrides, url=args.url,
            http_url=args.http_url, pid=args.server_pid, admin_token=args.admin_token))
        return await _sweep(args, mode, server, pool, utterances_from)


async def _sweep(args: argparse.Namespace, mode: str, server: ServerUnderTest, pool: ServerUnderTest | None,
                 utterances_from: Sequence[Clip]) -> dict[str, Any]:
    utterances = prepare_utterances(utterances_from, assumed_settings(server, args.env_file))
    xiaoai = args.xiaoai_share > 0
    shares = {"mixed": (args.xiaoai_share, 0.0), "native": (0.0, 0.0), "xiaoai": (1.0, 0.0),
              "xiaozhi": (0.0, 1.0)}[args.protocol]
    xiaoai = xiaoai and shares[0] > 0
    behaviour = Behaviour(gap_s=(args.gap_min_s, args.gap_max_s), xiaoai_share=shares[0], xiaozhi_share=shares[1],
                          talker_share=args.talker_share)
    steps = []
    with progress(len(args.sessions) * math.ceil(args.duration), "load", "s") as bar:
        for number, count in enumerate(args.sessions):
            bar.set_postfix_str(f"{count} sessions")
            steps.append(await run_step(server, utterances, behaviour, count, args.duration, seed=number + 1,
                                        xiaoai=xiaoai, bar=bar, pool=pool))
    return {"server_mode": mode, "asr_process": pool is not None, "talker_share": args.talker_share,
            "xiaoai_speakers": xiaoai, "utterances": [u.clip_id for u in utterances], "steps": steps,
            "largest_sessions_lag_ok": largest_ok(steps), "lag_target_s": LAG_TARGET_S}


# -- output --------------------------------------------------------------------------------------------------


_MIX = ("native", "xiaoai", "xiaozhi")


def render_markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for step in results["steps"]:
        srv, client, proc = step["server"], step["client"], step["process"]
        turns = srv.get("turns", {})
        latency = client["turn_latency_s"]
        mix = step["by_protocol"]
        rows.append([
            f"{step['sessions']} ({'+'.join(str(mix.get(p, 0)) for p in _MIX)})", str(step["connected"]),
            fmt(proc.get("cpu_cores"), 2), _per_session(proc.get("cpu_cores"), step["sessions"]),
            *([fmt((step.get("asr_pool_process") or {}).get("cpu_cores"), 2)] if results.get("asr_process") else []),
            fmt(proc.get("rss_mb")),
            fmt(srv.get("ingest_lag_p50_s"), 1, 1000),
            ("≥" if srv.get("ingest_lag_p99_beyond_histogram") else "") + fmt(srv.get("ingest_lag_p99_s"), 1, 1000),
            fmt(srv.get("frames_dropped")), f"{client['utterances']}/{client['replies']}/{fmt(turns.get('completed'))}",
            fmt(latency["p50"], 2), fmt(latency["p99"], 2), fmt(step["asr_queue_max"]),
            fmt(client["ping_rtt_s"]["p99"], 1, 1000), fmt(step["generator_cpu_cores"], 2),
            "yes" if step["lag_ok"] else "NO",
        ])
    best = results["largest_sessions_lag_ok"]
    errors = [f"{step['sessions']} sessions: {step['client']['errors']}" for step in results["steps"]
              if step["client"]["errors"] or step["ramp_connect_failures"]]
    header = [f"sessions ({'+'.join(_MIX)})", "connected", "server CPU (cores)", "CPU per session (% of a core)",
              *(["ASR process CPU (cores)"] if results.get("asr_process") else []), "RSS MB", "ingest lag p50 ms",
              "ingest lag p99 ms", "frames dropped", "utterances/replies/turns done", "turn latency p50 s",
              "turn latency p99 s", "ASR queue max", "ping RTT p99 ms", "generator CPU (cores)", "held: all in, lag p99 < 50 ms"]
    return "\n".join([
        f"## Load: simulated speakers streaming in real time — {results['server_mode']} server"
        f"{' (ASR on a second process)' if results.get('asr_process') else ''}, {args.duration:g} s per step, "
        f"{results.get('talker_share', 1.0):.0%} of speakers talking",
        "",
        markdown_table(header, rows),
        "",
        f"Largest session count held (every speaker connected, ingest lag p99 under "
        f"{results['lag_target_s'] * 1000:.0f} ms, and so at every smaller step): "
        f"**{best if best is not None else 'none'}**.",
        *([f"Speaker errors (connection refused or dropped): {'; '.join(errors)}."] if errors else []),
    ])


def _per_session(cores: float | None, sessions: int) -> str:
    return fmt(cores * 100 / sessions, 2) if cores is not None and sessions else "–"


def plot(results: dict[str, Any], path: Path) -> None:
    """Ingest lag, turn latency, CPU and memory against the number of sessions."""
    plt = pyplot()
    steps = results["steps"]
    x = [s["sessions"] for s in steps]

    def series(get: Any) -> list[float]:
        return [math.nan if (v := get(s)) is None else v for s in steps]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0][0]
    ax.plot(x, series(lambda s: _ms(s["server"].get("ingest_lag_p50_s"))), "o-", label="p50")
    ax.plot(x, series(lambda s: _ms(s["server"].get("ingest_lag_p99_s"))), "o-", label="p99")
    ax.axhline(results["lag_target_s"] * 1000, color="red", linestyle="--", linewidth=0.8, label="50 ms")
    ax.set_title("frame-ingest lag (server)")
    ax.set_ylabel("ms (log)")
    ax.set_yscale("log")
    ax.legend()
    ax = axes[0][1]
    ax.plot(x, series(lambda s: s["client"]["turn_latency_s"]["p50"]), "o-", label="p50")
    ax.plot(x, series(lambda s: s["client"]["turn_latency_s"]["p99"]), "o-", label="p99")
    ax.set_title("turn latency: end of speech → first reply audio")
    ax.set_ylabel("s")
    ax.legend()
    ax = axes[1][0]
    ax.plot(x, series(lambda s: s["process"].get("cpu_cores")), "o-", label="server")
    ax.plot(x, series(lambda s: s["generator_cpu_cores"]), "o-", label="load generator")
    ax.set_title("CPU (cores busy)")
    ax.legend()
    ax = axes[1][1]
    ax.plot(x, series(lambda s: s["process"].get("rss_mb")), "o-", label="RSS MB")
    ax.plot(x, series(lambda s: s["asr_queue_max"]), "o-", label="ASR queue max")
    ax.set_title("server memory and ASR queue")
    ax.legend()
    for ax in axes.flat:
        ax.set_xlabel("sessions")
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _sessions(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("session counts must be positive")
    return values


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=_sessions, default=[1, 10, 50, 100, 200],
                        help="session counts, one step each (default 1,10,50,100,200)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured per step (default 20)")
    add_server_options(parser, default="subprocess")
    parser.add_argument("--asr-process", action="store_true",
                        help="speech recognition on a second process (SERVER_ROLE=asr): the server measured is "
                             "an edge with ASR_BASE_URL pointing at it")
    parser.add_argument("--talker-share", type=_share, default=1.0,
                        help="share of the speakers that ask questions; the others stream silence (default 1)")
    add_crowd_options(parser, gap_s=(4.0, 12.0))
    parser.add_argument("--protocol", choices=("mixed", "native", "xiaoai", "xiaozhi"), default="mixed",
                        help="every speaker of one protocol, or native and open-xiaoai mixed by --xiaoai-share")
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    if args.asr_process and (args.url or args.in_process):
        parser.error("--asr-process starts both processes itself: not with --url or --in-process")
    return args


def add_server_options(parser: argparse.ArgumentParser, *, default: str) -> None:
    """Where the server runs: ``default`` (``subprocess`` or ``in-process``), the other one, or a URL."""
    where = parser.add_mutually_exclusive_group()
    if default == "subprocess":
        where.add_argument("--in-process", action="store_true", help="run the server in this process")
    else:
        where.add_argument("--server-process", action="store_true",
                           help="run the server as a subprocess (voicegrow serve)")
    where.add_argument("--url", help="a running server's WebSocket URL (its limits must admit every session)")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's pid on this machine (CPU, memory)")


def add_crowd_options(parser: argparse.ArgumentParser, *, gap_s: tuple[float, float]) -> None:
    parser.add_argument("--xiaoai-share", type=_share, default=0.5, help="share of open-xiaoai speakers (default 0.5)")
    parser.add_argument("--gap-min-s", type=float, default=gap_s[0],
                        help=f"silence after a reply, at least (default {gap_s[0]:g})")
    parser.add_argument("--gap-max-s", type=float, default=gap_s[1],
                        help=f"silence after a reply, at most (default {gap_s[1]:g})")


def _share(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 to 1, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.gap_min_s > args.gap_max_s:
        print("bench load: --gap-min-s must not exceed --gap-max-s", file=sys.stderr)
        return 2
    return run_command("load", args, run_load, clip_count=12, render=render_markdown, plot=plot,
                       passed=lambda results: True)


if __name__ == "__main__":
    raise SystemExit(main())
