"""``python -m bench pauses``: users who pause mid-sentence must not be answered before they finish.

Each fixture clip is cut at its quietest 30 ms between 35 % and 65 % of its speech (a gap between
words), and 400–700 ms of silence goes into the cut, so the user says "What is the weather …
like today?". The spliced clip is spoken in real time to an in-process server (native protocol, one
fresh connection per turn, the fake LLM/TTS service); then silence follows, as from a live microphone.

Per turn it counts:

* **talked over**: reply audio reached the device before the user's last word had been sent (the end of
  the clip's speech, by energy): the speaker answered half a question over the rest of it;
* the reply that came after the user finished, its latency (end of speech → first reply audio at the
  device) and what the server heard (the whole sentence, or only its second half);
* **LLM calls**: chat requests the fake LLM received, and ``voicegrow_llm_preemptive_total``'s ``wasted``
  (replies started on the transcript at the pause, dropped when the user went on: paid for nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import trio

from bench.common import (
    Clip,
    FakeAiKnobs,
    add_common_options,
    clip_pcm,
    fmt,
    markdown_table,
    parse_overrides,
    percentiles,
    progress,
    pyplot,
    run_command,
    save_figure,
    server_under_test,
)

__all__ = ["splice", "main"]

RATE = 16000
FRAME_MS = 20
_FRAME_BYTES = 2 * RATE * FRAME_MS // 1000


def _levels_db(samples: np.ndarray, window: int) -> np.ndarray:
    frames = samples[: len(samples) // window * window].astype(np.float64).reshape(-1, window)
    return 10 * np.log10(np.mean(frames ** 2, axis=1) / 32768.0 ** 2 + 1e-12)


def speech_bounds(samples: np.ndarray, threshold_db: float = -40.0) -> tuple[int, int]:
    """First and last sample of 10 ms windows louder than ``threshold_db``."""
    loud = np.nonzero(_levels_db(samples, 160) > threshold_db)[0]
    if not len(loud):
        raise ValueError("no speech in the clip")
    return int(loud[0]) * 160, int(loud[-1] + 1) * 160


def splice(samples: np.ndarray, pause_ms: int) -> tuple[np.ndarray, int, int]:
    """The clip with ``pause_ms`` of silence at its quietest 30 ms in the middle of its speech.

    Returns the spliced samples, where the pause starts and where the speech ends in them.
    """
    start, end = speech_bounds(samples)
    lo, hi = start + int(0.35 * (end - start)), start + int(0.65 * (end - start))
    window = 480
    levels = [float(np.mean(samples[i:i + window].astype(np.float64) ** 2)) for i in range(lo, hi - window, 80)]
    cut = lo + 80 * int(np.argmin(levels)) + window // 2
    silence = np.zeros(RATE * pause_ms // 1000, dtype=samples.dtype)
    return np.concatenate([samples[:cut], silence, samples[cut:]]), cut, end + len(silence)


@dataclasses.dataclass
class PauseTurn:
    clip_id: str
    lang: str
    pause_ms: int
    talked_over: bool = False
    replies_heard: int = 0  # turns whose audio reached the device
    latency_ms: float | None = None  # end of speech → first audio of the reply after it
    heard: str = ""  # the transcript of the turn that answered
    expected: str = ""
    llm_calls: int = 0
    wasted: float = 0.0
    failure: str | None = None


async def _turn(server: Any, clip: Clip, pause_ms: int, device_id: str, timeout_s: float) -> PauseTurn:
    from voicegrow.client import open_native_client
    from voicegrow.protocol import Audio, AudioFormat, Control

    samples = np.asarray(clip.pcm, dtype=np.int16)
    spliced, _cut, speech_end = splice(samples, pause_ms)
    pcm = spliced.astype("<i2").tobytes()
    pcm += bytes(-len(pcm) % _FRAME_BYTES)
    frames = [pcm[i:i + _FRAME_BYTES] for i in range(0, len(pcm), _FRAME_BYTES)]
    last_speech_frame = (2 * speech_end - 1) // _FRAME_BYTES
    result = PauseTurn(clip.id, clip.lang, pause_ms, expected=clip.text)
    sent_end_at: float | None = None
    first_audio: dict[int, float] = {}
    heard: dict[int, str] = {}
    done = trio.Event()
    async with open_native_client(server.ws_url, device_id=device_id, audio_out=AudioFormat(24000)) as client:

        async def microphone() -> None:
            nonlocal sent_end_at
            started = trio.current_time()
            index = 0
            while not done.is_set():
                await trio.sleep_until(started + index * FRAME_MS / 1000)
                await client.send_audio(frames[index] if index < len(frames) else bytes(_FRAME_BYTES))
                if index == last_speech_frame:
                    sent_end_at = trio.current_time()
                index += 1

        async def speaker() -> None:
            while True:
                frame = await client.next_frame()
                now = trio.current_time()
                if isinstance(frame, Audio) and frame.pcm:
                    first_audio.setdefault(frame.turn_id, now)
                elif isinstance(frame, Control):
                    if frame.event == "asr_final":
                        heard[frame.turn_id] = str(frame.data.get("text", ""))
                    elif frame.event == "turn_end" and sent_end_at is not None and frame.turn_id in first_audio \
                            and first_audio[frame.turn_id] >= sent_end_at:
                        done.set()
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(microphone)
            with trio.move_on_after(len(frames) * FRAME_MS / 1000 + timeout_s):
                await speaker()
            done.set()
            nursery.cancel_scope.cancel()
    end_at = sent_end_at if sent_end_at is not None else float("inf")
    result.replies_heard = len(first_audio)
    result.talked_over = any(at < end_at for at in first_audio.values())
    after = sorted((at, turn) for turn, at in first_audio.items() if at >= end_at)
    if after:
        at, turn = after[0]
        result.latency_ms = 1000 * (at - end_at)
        result.heard = heard.get(turn, "")
    else:
        result.failure = "no reply after the user finished"
    return result


def _wasted(snapshot: Any) -> float:
    return snapshot.total("voicegrow_llm_preemptive_total", outcome="wasted") if snapshot is not None else 0.0


async def run_pauses(args: argparse.Namespace, clips: Sequence[Clip]) -> dict[str, Any]:
    pauses = [int(p) for p in args.pause_ms.split(",")]
    async with server_under_test("in-process", fake_ai=FakeAiKnobs.from_args(args),
                                 overrides=parse_overrides(args.set)) as server:
        turns: list[PauseTurn] = []
        with progress(len(clips), "pauses", "turn") as bar:
            for index, clip in enumerate(clips):
                before = _wasted(await server.metrics())
                server.forget_ai_requests()
                try:
                    turn = await _turn(server, clip, pauses[index % len(pauses)], f"bench-pauses-{index}",
                                       args.timeout)
                except Exception as exc:  # one failed turn is a figure, not the end of the run
                    turn = PauseTurn(clip.id, clip.lang, pauses[index % len(pauses)],
                                     failure=f"{type(exc).__name__}: {exc}")
                await trio.sleep(0.5)  # let a cancelled preemptive turn finish its count
                turn.wasted = _wasted(await server.metrics()) - before
                requests = server.fake_ai.requests if server.fake_ai is not None else []
                turn.llm_calls = sum(1 for r in requests if r["path"].endswith("/chat/completions"))
                turns.append(turn)
                bar.update()
        settings = server.settings
    from voicegrow.textmetrics import char_error_rate

    ok = [t for t in turns if t.latency_ms is not None]
    return {
        "settings": {"VAD_SILENCE_MS": settings.vad_silence_ms, "LLM_PREEMPTIVE": settings.llm_preemptive,
                     "LLM_PREEMPTIVE_AFTER_MS": settings.llm_preemptive_after_ms},
        "summary": {
            "turns": len(turns),
            "talked_over": sum(t.talked_over for t in turns),
            "answered_after_finish": len(ok),
            "latency_ms": percentiles(t.latency_ms for t in ok),
            "llm_calls": sum(t.llm_calls for t in turns),
            "wasted_llm_calls": sum(t.wasted for t in turns),
            "heard_cer_mean": statistics.mean(char_error_rate(t.expected, t.heard, t.lang) for t in ok) if ok else None,
        },
        "turns": [dataclasses.asdict(t) for t in turns],
    }


def render_markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    s, cfg = results["summary"], results["settings"]
    rows = [[t["clip_id"], str(t["pause_ms"]), "**yes**" if t["talked_over"] else "no", str(t["replies_heard"]),
             fmt(t["latency_ms"]), str(t["llm_calls"]), fmt(t["wasted"]), (t["heard"] or t["failure"] or "")[:48]]
            for t in results["turns"]]
    return "\n".join([
        f"## Mid-sentence pauses ({args.pause_ms} ms): {s['talked_over']} of {s['turns']} users talked over — "
        f"VAD_SILENCE_MS={cfg['VAD_SILENCE_MS']}, LLM_PREEMPTIVE={cfg['LLM_PREEMPTIVE']}", "",
        f"Answered after the user finished: {s['answered_after_finish']}/{s['turns']}, latency p50 "
        f"{fmt(s['latency_ms']['p50'])} ms; LLM calls {s['llm_calls']} for {s['turns']} questions, wasted "
        f"(preemptive, dropped) {fmt(s['wasted_llm_calls'])}; CER of what was answered "
        f"{fmt(s['heard_cer_mean'], 3)}.", "",
        markdown_table(["clip", "pause ms", "talked over", "replies heard", "latency ms", "LLM calls", "wasted",
                        "heard"], rows, align="lrlrrrrl"),
    ])


def plot(results: dict[str, Any], path: Any) -> None:
    """Latency of the reply after the user finished, per pause length; talked-over turns in red."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in results["turns"]:
        if t["latency_ms"] is not None:
            ax.scatter(t["pause_ms"], t["latency_ms"], color="C3" if t["talked_over"] else "C0")
    ax.set_xlabel("pause inside the sentence (ms)")
    ax.set_ylabel("end of speech → first reply audio (ms)")
    ax.set_title(f"Mid-sentence pauses: {results['summary']['talked_over']} talked over (red)")
    save_figure(fig, path)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench pauses", description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=8, help="spliced utterances, zh and en mixed (default 8)")
    parser.add_argument("--pause-ms", default="400,500,600,700", help="pauses, taken in turn (default 400,500,600,700)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a reply (default 30)")
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.turns < 1:
        parser.error("--turns must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_command("pauses", args, run_pauses, clip_count=args.turns, render=render_markdown, plot=plot,
                       passed=lambda results: results["summary"]["talked_over"] == 0)
