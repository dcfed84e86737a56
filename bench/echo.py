"""``python -m bench echo``: a speaker that hears itself — self-interruptions and true barge-ins.

For each echo gain (−20, −12, −6, −3 dB; 250 ms, reverb, fan noise) and each policy side by side —
``echo_safe`` (``BARGE_IN=auto`` for a device without echo cancellation) and plain ``vad`` — it plays
``--replies`` fixture-speech replies of ≥ 4 s into a :class:`bench.acoustics.Room` and runs the
server's own microphone front end on what the microphone hears: the session's
:class:`~voicegrow.streaming.bargein.EchoGuard` (WebRTC echo cancellation with the reply as the
reference, placed where the device plays it) and :class:`~voicegrow.pipeline.vad.VadSegmenter`
with the server's settings, and the barge-in rule of ``VoiceSession`` (``BARGE_IN_MIN_MS`` of
speech that passes the guard). Then ``--trials`` replies with a user talking over them at the echo's
level: success is a barge-in within 800 ms of the user's speech onset. ``--jitter-ms J`` starts each
reply's playout at the device a seeded 0…J ms after the server's reference (network and scheduling
latency of its first chunk, which differs from one reply to the next on a real network).

This replays the front end and the decision offline, faster than real time and deterministically
(seeded), so that all eight combinations run in one go on a busy machine; sockets, pacing and
ASR are covered by ``tests/test_echo_barge_in.py``, which streams both protocols in real time.
The echo canceller's CPU is measured per second of microphone audio (``time.process_time``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.acoustics import EchoPath, Room, active_rms, load_fixture_clips
from voicegrow.audio import float32_to_pcm, resample
from voicegrow.streaming.bargein import EchoGuard, resolve_mode
from voicegrow.pipeline.vad import SpeechStarted, UtteranceEnded, VadSegmenter

RATE = 16000
FRAME = 1440  # open-xiaoai's 90 ms microphone frames
GAINS = (-20.0, -12.0, -6.0, -3.0)
REPLY_IDS = ("en-05", "en-04")  # 4.2 s of speech
USER_IDS = ("en-00", "zh-00", "en-01", "zh-01", "en-02", "zh-02", "en-03", "zh-03", "en-06", "en-07")


class _Session:
    """The front end and barge-in rule of one VoiceSession, fed microphone frames in order."""

    def __init__(self, policy: str, settings: Any) -> None:
        from voicegrow.echo import EchoCanceller

        mode = resolve_mode(policy, device_cancels_echo=False)
        self.guard = EchoGuard(mode, kept_db=settings.barge_in_echo_kept_db,
                               canceller=EchoCanceller() if mode.cancel_echo else None)
        self.vad = VadSegmenter(sample_rate=RATE, frame_ms=settings.vad_frame_ms,
                                aggressiveness=settings.vad_aggressiveness, preroll_ms=settings.vad_preroll_ms,
                                silence_ms=settings.vad_silence_ms, min_speech_ms=settings.vad_min_speech_ms,
                                max_utterance_s=settings.vad_max_utterance_s)
        self.min_ms = settings.barge_in_min_ms
        self.position = 0
        self.onset = 0.0
        self.cpu_s = 0.0
        self.barge_ins: list[int] = []  # microphone positions
        self.utterances_over_reply = 0

    def feed(self, pcm: bytes, playing: bool) -> None:
        self.position += len(pcm) // 2
        started = time.process_time()
        clean = self.guard.front_end(pcm, self.position / RATE, self.position / RATE)
        self.cpu_s += time.process_time() - started
        for event in self.vad.feed(clean):
            if isinstance(event, SpeechStarted):
                self.onset = event.at_s
            elif isinstance(event, UtteranceEnded) and playing:
                self.utterances_over_reply += 1
        if (playing and self.vad.current_speech_ms >= self.min_ms
                and (not self.barge_ins or self.barge_ins[-1] < self.position - 2 * RATE)
                and self.guard.speech_counts(self.onset)):
            self.barge_ins.append(self.position)


def _run(policy: str, gain: float, settings: Any, reply: np.ndarray, users: list[tuple[dict, np.ndarray]],
         replies: int, trials: int, seed: int, jitter_ms: float = 0.0) -> dict[str, Any]:
    path = EchoPath(delay_ms=250, gain_db=gain, rt60_s=0.25, noise="fan", noise_dbfs=-55, seed=seed)
    room = Room(path)
    session = _Session(policy, settings)
    pcm24 = resample(float32_to_pcm(reply), RATE, 24000).astype("<i2").tobytes()
    echo_dbfs = 20 * np.log10(active_rms(reply)) + gain
    jitter = np.random.default_rng(seed + 2)
    while room.position < RATE:  # a second of the room before the first reply (the server's clock sets)
        session.feed(room.capture(FRAME), playing=False)

    def play_reply(user: np.ndarray | None) -> tuple[bool, int | None]:
        """One reply from the next frame on; returns (stopped, stop latency in samples from user onset)."""
        start = room.position + FRAME
        step = 2400 * 2  # 100 ms chunks, as the pacer sends them
        late = round(jitter.uniform(0.0, jitter_ms) * RATE / 1000) if jitter_ms > 0 else 0
        start_heard = start + late
        for i, offset in enumerate(range(0, len(pcm24), step)):
            at = start + i * 1600
            room.play(pcm24[offset: offset + step], 24000, at + late)
            if session.guard.tap is not None:  # the server's reference, at the same playout time
                session.guard.tap.played(pcm24[offset: offset + step], 24000, at / RATE)
        onset = None
        if user is not None:
            at = start_heard + RATE  # a second into the reply
            room.add_talker(user, at, dbfs=echo_dbfs, reverb=False)
            frames = user[: user.size // 160 * 160].reshape(-1, 160)
            energy = np.mean(frames.astype(np.float64) ** 2, axis=1)
            onset = at + int(np.argmax(energy >= energy.max() * 1e-3)) * 160
        end = start_heard + reply.size
        before = len(session.barge_ins)
        while room.position < end + RATE:
            session.feed(room.capture(FRAME), playing=room.position < end + 8000)
            if len(session.barge_ins) > before:
                # The reply is stopped: the device drops what it buffered, the server takes back
                # the reference of what will not play (VoiceSession._interrupt).
                room.stop_playback(room.position)
                if session.guard.tap is not None:
                    session.guard.tap.stopped(room.position / RATE)
                break
        stopped = len(session.barge_ins) > before
        while room.position < end + 2 * RATE:  # the room settles before the next reply
            session.feed(room.capture(FRAME), playing=False)
        if not stopped:
            return False, None
        return True, (session.barge_ins[before] - onset) if onset is not None else None

    # The first reply of a session (the canceller has not converged yet) is part of the count.
    self_interruptions = sum(play_reply(None)[0] for _ in range(replies))
    latencies: list[float] = []
    for index in range(trials):
        _, user = users[index % len(users)]
        stopped, latency = play_reply(user)
        if stopped and latency is not None:
            latencies.append(latency / RATE)
    ok = [x for x in latencies if 0 <= x <= 0.8]
    audio_s = session.position / RATE
    return {"policy": policy, "gain_db": gain, "jitter_ms": jitter_ms, "self_interruptions": self_interruptions, "replies": replies,
            "barge_in_ok": len(ok), "trials": trials,
            "latency_p50_ms": round(1000 * float(np.median(ok)), 0) if ok else None,
            "latency_max_ms": round(1000 * max(ok), 0) if ok else None,
            "cpu_ms_per_s": round(1000 * session.cpu_s / audio_s, 2), "audio_s": round(audio_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench echo", description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=Path, default=None)
    parser.add_argument("--replies", type=int, default=10)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--gains", default=",".join(str(g) for g in GAINS))
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--jitter-ms", type=float, default=0.0,
                        help="each reply reaches the device a seeded 0..J ms after the server's reference")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from bench.asr import default_clips_dir
    from bench.common import machine_info
    from voicegrow.settings import load_settings

    settings = load_settings({}, env_file=None)  # the server's defaults (VAD, BARGE_IN_*)
    clips = {e["id"]: (e, c) for e, c in load_fixture_clips(args.clips or default_clips_dir())}
    reply = np.concatenate([clips[i][1] for i in REPLY_IDS])
    reply = reply / active_rms(reply) * 10 ** (-20 / 20)
    users = [clips[i] for i in USER_IDS]
    rows = []
    for gain in (float(g) for g in args.gains.split(",")):
        for policy in ("auto", "vad"):
            row = _run(policy, gain, settings, reply, users, args.replies, args.trials, args.seed, args.jitter_ms)
            row["policy"] = "echo_safe (auto)" if policy == "auto" else "vad"
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(f"playout jitter per reply: 0-{args.jitter_ms:g} ms")
    print("| echo gain | policy | self-interruptions / replies | barge-in ≤ 800 ms / trials | latency p50 / max ms "
          "| echo handling CPU ms per s |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['gain_db']:g} dB | {r['policy']} | {r['self_interruptions']} / {r['replies']} | "
              f"{r['barge_in_ok']} / {r['trials']} | {r['latency_p50_ms']} / {r['latency_max_ms']} | "
              f"{r['cpu_ms_per_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"command": "echo", "machine": machine_info(), "rows": rows}, indent=1,
                                        default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
