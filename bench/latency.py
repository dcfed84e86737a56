"""``python -m bench latency``: how long after the user stops talking the speaker starts answering.

Fixture clips are spoken in real time to a server (in this process by default, with the fake LLM/TTS
service), one fresh connection per turn, and every turn yields the server's per-stage marks and the
headline: **end of speech → first reply audio at the client**. Two ways to place the end of speech:

* same clock (in-process, native protocol): the server's ``speech_end`` mark and the client's arrival
  time are both ``trio.current_time()`` of one run. The server stamps each AUDIO frame with its clock,
  and the first one is sent in the same tick as the ``first_audio_sent`` mark, so
  ``speech_end = stamp - (first_audio_sent - speech_end)``.
* device side (``--url``, open-xiaoai, xiaozhi, and a cross-check in-process): the server's VAD is sans-IO and
  deterministic, so replaying it here over the same audio in the same chunks finds the same end of
  speech in the clip; then ``headline = client_first_audio_s + (clip end - speech end)``, which also
  counts the network both ways.

In the same run every component is measured alone on the same clips: ASR through the same
``AsrService`` on the very audio the server transcribed, the LLM's time to first token and first
sentence through the same client, TTS time to first audio on that first sentence. The **pipeline
overhead** is the headline minus the components' critical path (VAD hangover alongside speculative
ASR, then LLM to the first sentence, then TTS to the first audio): what queues, sockets, resampling
and pacing add on top of work that has to be done anyway.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.common import (
    Clip,
    FakeAiKnobs,
    ServerUnderTest,
    SpeechSpan,
    add_common_options,
    assumed_settings,
    clip_pcm,
    fmt,
    locate_speech,
    markdown_table,
    parse_overrides,
    percentiles,
    progress,
    pyplot,
    run_command,
    save_figure,
    server_under_test,
)

__all__ = ["STAGES", "COMPONENTS", "TurnMeasurement", "main", "run_latency"]

#: Server marks reported from the end of speech, in pipeline order.
STAGES = (
    ("asr_done", "ASR done"),
    ("llm_first_token", "LLM first token"),
    ("first_sentence", "first sentence ready"),
    ("tts_first_audio", "TTS first audio"),
    ("first_audio_sent", "first audio sent (server)"),
)

#: Components measured alone, in the order of the critical path.
COMPONENTS = (
    ("hangover_ms", "VAD hangover (inherent: VAD_SILENCE_MS of silence ends the utterance)"),
    ("asr_ms", "ASR alone (same AsrService, same utterance audio)"),
    ("llm_ttft_ms", "LLM time to first token"),
    ("llm_first_sentence_ms", "LLM time to first sentence"),
    ("tts_first_audio_ms", "TTS time to first audio (first sentence)"),
    ("critical_path_ms", "critical path of the components"),
)

NATIVE_FRAME_MS = 20
XIAOAI_FRAME_BYTES = 2 * 1440
XIAOZHI_FRAME_BYTES = 2 * 16 * 60  # one 60 ms Opus packet of 16 kHz audio
_MASK32 = 0xFFFF_FFFF


@dataclasses.dataclass
class TurnMeasurement:
    """One spoken turn: what the server heard and said, its stage marks, and the components alone."""

    index: int
    clip_id: str
    lang: str
    protocol: str
    ok: bool = False
    failure: str | None = None
    transcript: str = ""
    reply: str = ""
    #: server marks, ms after the server's end-of-speech mark
    stages_ms: dict[str, float] = dataclasses.field(default_factory=dict)
    headline_ms: float | None = None
    headline_method: str = ""
    same_clock_headline_ms: float | None = None
    device_side_headline_ms: float | None = None
    hangover_ms: float | None = None
    speculation_delay_ms: float | None = None
    asr_ms: float | None = None
    asr_text: str = ""
    llm_ttft_ms: float | None = None
    llm_first_sentence_ms: float | None = None
    tts_first_audio_ms: float | None = None
    critical_path_ms: float | None = None
    overhead_ms: float | None = None
    #: every run of each component (the medians are above)
    component_runs: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    component_failure: str | None = None


# -- one turn, as a device ---------------------------------------------------------------------------------


class _FirstAudioTap:
    """A NativeClient passed through, noting each turn's first reply audio: arrival time and server stamp."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.first_audio: dict[int, tuple[float, int]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def next_frame(self) -> Any:
        from voicegrow.protocol import Audio

        frame = await self._client.next_frame()
        if isinstance(frame, Audio) and frame.pcm and frame.turn_id not in self.first_audio:
            self.first_audio[frame.turn_id] = (trio.current_time(), frame.timestamp_ms)
        return frame


def _pad(pcm: bytes, chunk_bytes: int) -> bytes:
    """Whole chunks only: a short last chunk would shift the silence after it on the device's grid."""
    return pcm + bytes(-len(pcm) % chunk_bytes)


async def _native_turn(server: ServerUnderTest, pcm: bytes, span: SpeechSpan, turn: TurnMeasurement,
                       device_id: str, timeout_s: float) -> None:
    from voicegrow.client import open_native_client, stream_wav_and_collect
    from voicegrow.protocol import AudioFormat

    async with open_native_client(server.ws_url, device_id=device_id, audio_out=AudioFormat(24000)) as client:
        tap = _FirstAudioTap(client)
        result = await stream_wav_and_collect(tap, pcm, frame_ms=NATIVE_FRAME_MS, timeout_s=timeout_s)
    turn.transcript, turn.reply = result.transcript, result.reply
    timings = result.timings_ms
    first = tap.first_audio.get(result.turn_id or 0)
    if result.failure or result.timed_out or result.client_first_audio_s is None or first is None:
        turn.failure = result.failure or ("timed out" if result.timed_out else "no reply audio")
        return
    turn.stages_ms = _stages(timings)
    end = timings.get("speech_end")
    turn.device_side_headline_ms = 1000 * (result.client_first_audio_s + span.trailing_s)
    if server.mode == "in-process" and end is not None and "first_audio_sent" in timings:
        arrival, stamp = first
        arrival_ms = int(arrival * 1000)
        sent_ms = arrival_ms - ((arrival_ms - stamp) & _MASK32)  # the server's clock, unwrapped
        turn.same_clock_headline_ms = arrival * 1000 - sent_ms + (timings["first_audio_sent"] - end)
    turn.ok = True


async def _xiaoai_turn(server: ServerUnderTest, pcm: bytes, span: SpeechSpan, turn: TurnMeasurement,
                       serial: str, timeout_s: float) -> None:
    from bench.xiaoai_emulator import run_emulator

    async with run_emulator(server.ws_url, serial=serial) as emu:
        await emu.wait_for_request("start_recording", timeout=10)
        heard_before = len(emu.play_frames)
        await emu.stream_pcm(pcm, realtime=True)
        clip_sent_at = trio.current_time()  # the last clip frame has just gone out
        with trio.move_on_after(timeout_s):
            await emu.wait_until(lambda e: len(e.play_frames) > heard_before, timeout=timeout_s)
        if len(emu.play_frames) <= heard_before:
            turn.failure = "no reply audio"
            return
        first_audio_s = emu.play_frames[heard_before].received_at - clip_sent_at
        with trio.move_on_after(timeout_s):  # the reply is over once play frames stop for a second
            while trio.current_time() - emu.play_frames[-1].received_at < 1.0:
                await trio.sleep(0.1)
    turn.device_side_headline_ms = 1000 * (first_audio_s + span.trailing_s)
    records = await _stored_turns(server, f"xiaoai-{serial}")  # the driver's device id for a serial
    if records:
        record = records[0]
        turn.stages_ms = _stages(record.get("timings_ms") or {})
        turn.transcript, turn.reply = record.get("transcript", ""), record.get("reply_text", "")
    turn.ok = True


def xiaozhi_url(ws_url: str) -> str:
    """A board's ``websocket.url``: the server's speaker URL with the firmware's path, unless it has one."""
    from urllib.parse import urlsplit

    from voicegrow.protocol.xiaozhi import DEFAULT_PATH

    return ws_url if urlsplit(ws_url).path.startswith("/xiaozhi/") else ws_url.rstrip("/") + DEFAULT_PATH


async def _xiaozhi_turn(server: ServerUnderTest, pcm: bytes, span: SpeechSpan, turn: TurnMeasurement,
                        device_id: str, timeout_s: float) -> None:
    from bench.xiaozhi_emulator import run_xiaozhi_emulator

    async with run_xiaozhi_emulator(xiaozhi_url(server.ws_url), device_id=device_id, mcp=False,
                                    keep_played_audio=False) as board:
        await board.listen_start("auto")
        await board.stream_pcm(pcm, realtime=True)
        clip_sent_at = trio.current_time()  # the last clip packet has just gone out
        with trio.move_on_after(timeout_s):
            await board.wait_until(lambda b: b.first_packet_at is not None, timeout=timeout_s)
        if board.first_packet_at is None:
            turn.failure = "no reply audio"
            return
        first_audio_s = board.first_packet_at - clip_sent_at
        with trio.move_on_after(timeout_s):
            await board.wait_for_tts("stop", timeout=timeout_s)
    turn.device_side_headline_ms = 1000 * (first_audio_s + span.trailing_s)
    records = await _stored_turns(server, f"xiaozhi-{device_id}")  # the driver's device id for a Device-Id
    if records:
        record = records[0]
        turn.stages_ms = _stages(record.get("timings_ms") or {})
        turn.transcript, turn.reply = record.get("transcript", ""), record.get("reply_text", "")
    turn.ok = True


def _stages(timings: dict[str, Any]) -> dict[str, float]:
    """The server's marks (ms since speech start) as ms since its end-of-speech mark."""
    end = timings.get("speech_end")
    if end is None:
        return {}
    return {name: timings[name] - end for name, _ in STAGES if timings.get(name) is not None}


async def _stored_turns(server: ServerUnderTest, device_id: str) -> list[dict[str, Any]]:
    """The device's turns from the admin API, once persistence has them (it writes through a spool)."""
    with trio.move_on_after(5.0):
        while not (records := await server.turn_records(device_id, limit=1)):
            await trio.sleep(0.2)
        return records
    return []


# -- the components alone ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Components:
    """The ASR service, LLM client and TTS engine the server uses (in-process: the very same objects)."""

    asr: Any
    llm: Any
    tts: Any
    settings: Any

    repeat: int = 3

    async def measure(self, turn: TurnMeasurement, span: SpeechSpan) -> None:
        """Each component ``repeat`` times back to back; the median goes into the turn, every run into
        ``component_runs`` (one run caught by a busy moment of the machine must not make the overhead)."""
        from voicegrow.language import detect_language

        speculative = bool(self.settings.asr_speculative and span.paused_audio is not None)
        audio = span.paused_audio if speculative and span.paused_audio is not None else span.utterance_audio
        language = None if self.settings.asr_language == "auto" else self.settings.asr_language
        runs: dict[str, list[float]] = {"asr_ms": [], "llm_ttft_ms": [], "llm_first_sentence_ms": [],
                                        "tts_first_audio_ms": []}
        for _ in range(self.repeat):
            elapsed_ms, turn.asr_text = await self._asr_once(audio, language)
            runs["asr_ms"].append(elapsed_ms)
        heard = turn.transcript or turn.asr_text
        lang = detect_language(heard) if heard else (turn.lang or "en")
        sentence = ""
        for _ in range(self.repeat if heard.strip() else 0):
            ttft, first_sentence, sentence = await self._llm_once(heard)
            _append(runs["llm_ttft_ms"], ttft)
            _append(runs["llm_first_sentence_ms"], first_sentence)
        for _ in range(self.repeat if sentence else 0):
            _append(runs["tts_first_audio_ms"], await self._tts_once(sentence, lang))
        turn.component_runs = runs
        for name, values in runs.items():
            setattr(turn, name, statistics.median(values) if values else None)
        turn.hangover_ms = 1000 * span.hangover_s
        assert turn.asr_ms is not None
        preemptive = speculative and bool(getattr(self.settings, "llm_preemptive", False))
        if speculative and span.paused_at_s is not None:
            turn.speculation_delay_ms = 1000 * (span.paused_at_s - span.end_s)
            asr_path = max(turn.hangover_ms, turn.speculation_delay_ms + turn.asr_ms)
        else:
            asr_path = turn.hangover_ms + turn.asr_ms
        if turn.llm_first_sentence_ms is not None and turn.tts_first_audio_ms is not None:
            turn.critical_path_ms = asr_path + turn.llm_first_sentence_ms + turn.tts_first_audio_ms
            if preemptive and turn.speculation_delay_ms is not None:
                # LLM_PREEMPTIVE: the reply is prepared during the hangover and held until it ends
                ask = turn.speculation_delay_ms + max(turn.asr_ms, self.settings.llm_preemptive_after_ms)
                turn.critical_path_ms = max(turn.hangover_ms, ask + turn.llm_first_sentence_ms
                                            + turn.tts_first_audio_ms)
            if turn.headline_ms is not None:
                turn.overhead_ms = turn.headline_ms - turn.critical_path_ms

    async def _asr_once(self, audio: bytes, language: str | None) -> tuple[float, str]:
        started = trio.current_time()
        transcript = await self.asr.transcribe(audio, language=language)
        return 1000 * (trio.current_time() - started), transcript.text

    async def _llm_once(self, heard: str) -> tuple[float | None, float | None, str]:
        """Time to first token and to the first sentence (the splitter the turn uses), and that sentence."""
        from voicegrow.pipeline.llm import DEFAULT_SYSTEM_PROMPT, ConversationHistory
        from voicegrow.pipeline.sentences import SentenceSplitter

        messages = ConversationHistory(max_turns=0, max_chars=0).messages(
            self.settings.llm_system_prompt or DEFAULT_SYSTEM_PROMPT, heard[: self.settings.max_llm_input_chars])
        splitter = SentenceSplitter()
        ttft: float | None = None
        started = trio.current_time()
        async with contextlib.aclosing(self.llm.stream(messages)) as deltas:
            async for delta in deltas:
                if not delta:
                    continue
                if ttft is None:
                    ttft = 1000 * (trio.current_time() - started)
                sentences = splitter.feed(delta)
                if sentences:
                    return ttft, 1000 * (trio.current_time() - started), sentences[0]
        rest = splitter.flush()
        return ttft, (1000 * (trio.current_time() - started) if rest else None), (rest[0] if rest else "")

    async def _tts_once(self, sentence: str, lang: str) -> float | None:
        started = trio.current_time()
        async with contextlib.aclosing(self.tts.synthesize(sentence, lang)) as chunks:
            async for chunk in chunks:
                if chunk:
                    return 1000 * (trio.current_time() - started)
        return None


def _append(values: list[float], value: float | None) -> None:
    if value is not None:
        values.append(value)


@contextlib.asynccontextmanager
async def _components_for(server: ServerUnderTest, settings: Any, repeat: int) -> Any:
    if server.handle is not None:
        services = server.handle.services
        yield Components(services.asr, services.llm, services.tts, settings, repeat)
        return
    from voicegrow.pipeline.asr import build_asr_service
    from voicegrow.pipeline.llm import build_llm
    from voicegrow.pipeline.tts import build_tts

    async with httpx.AsyncClient(timeout=httpx.Timeout(30.0)) as http:
        asr = build_asr_service(settings)
        await asr.warm_up()
        yield Components(asr, build_llm(settings, http_client=http), build_tts(settings, http_client=http), settings,
                         repeat)


# -- the run ------------------------------------------------------------------------------------------------


async def run_latency(args: argparse.Namespace, clips: Sequence[Clip]) -> dict[str, Any]:
    """Speak the clips, measure the components, and return every figure (see :func:`summarize`)."""
    overrides = parse_overrides(args.set)
    mode = "url" if args.url else "in-process"
    async with server_under_test(mode, fake_ai=None if args.url else FakeAiKnobs.from_args(args),
                                 overrides=overrides, url=args.url, http_url=args.http_url,
                                 admin_token=args.admin_token) as server:
        settings = assumed_settings(server, args.env_file)
        chunk = {"native": NATIVE_FRAME_MS * 32, "xiaoai": XIAOAI_FRAME_BYTES,
                 "xiaozhi": XIAOZHI_FRAME_BYTES}[args.protocol]
        async with _components_for(server, settings, args.repeat) as components:
            run_id = uuid.uuid4().hex[:8]
            turns: list[TurnMeasurement] = []
            plan = [(-1 - i, clip) for i, clip in enumerate(clips[: args.warmup])] + list(enumerate(clips))
            with progress(len(plan), "latency", "turn") as bar:
                for index, clip in plan:
                    turn = await _measure_turn(server, components, clip, index, chunk, args, f"{run_id}-{index}")
                    if index >= 0:
                        turns.append(turn)
                    bar.update()
    return summarize(turns, server.mode, settings)


async def _measure_turn(server: ServerUnderTest, components: Components, clip: Clip, index: int, chunk: int,
                        args: argparse.Namespace, device_id: str) -> TurnMeasurement:
    turn = TurnMeasurement(index, clip.id, clip.lang, args.protocol)
    pcm = _pad(clip_pcm(clip), chunk)
    span = locate_speech(pcm, components.settings, chunk_bytes=chunk)
    if span is None:
        turn.failure = "the VAD finds no utterance in this clip"
        return turn
    try:
        if args.protocol == "native":
            await _native_turn(server, pcm, span, turn, f"bench-latency-{device_id}", args.timeout)
        elif args.protocol == "xiaozhi":
            await _xiaozhi_turn(server, pcm, span, turn, f"bench-latency-{device_id}", args.timeout)
        else:
            await _xiaoai_turn(server, pcm, span, turn, f"bench-latency-{device_id}", args.timeout)
    except Exception as exc:  # one failed turn is a figure, not the end of the run
        turn.failure = f"{type(exc).__name__}: {exc}"
    if turn.same_clock_headline_ms is not None:
        turn.headline_ms, turn.headline_method = turn.same_clock_headline_ms, "same_clock"
    elif turn.device_side_headline_ms is not None:
        turn.headline_ms, turn.headline_method = turn.device_side_headline_ms, "device_side"
    try:
        await components.measure(turn, span)
    except Exception as exc:  # an ASR timeout on a starved machine: the turn's own figures still count
        turn.component_failure = f"{type(exc).__name__}: {exc}"
    return turn


def summarize(turns: Sequence[TurnMeasurement], mode: str, settings: Any) -> dict[str, Any]:
    """Percentiles per stage and component, the headline and the overhead, and every turn's figures."""
    ok = [t for t in turns if t.ok]
    stages = {name: percentiles(t.stages_ms.get(name) for t in ok) for name, _ in STAGES}
    components = {name: percentiles(getattr(t, name) for t in ok) for name, _ in COMPONENTS}
    cross_check = [t.same_clock_headline_ms - t.device_side_headline_ms for t in ok
                   if t.same_clock_headline_ms is not None and t.device_side_headline_ms is not None]
    return {
        "server_mode": mode,
        "server_settings": _settings_summary(settings),
        "summary": {
            "turns": len(turns),
            "turns_ok": len(ok),
            "headline_ms": percentiles(t.headline_ms for t in ok),
            "headline_method": sorted({t.headline_method for t in ok}),
            "stages_ms": stages,
            "components_ms": components,
            "overhead_ms": percentiles(t.overhead_ms for t in ok),
            "same_clock_minus_device_side_ms": percentiles(cross_check),
        },
        "turns": [dataclasses.asdict(t) for t in turns],
    }


def _settings_summary(settings: Any) -> dict[str, Any]:
    masked = settings.masked()
    keys = ("ASR_ENGINE", "ASR_SPECULATIVE", "LLM_PREEMPTIVE", "ASR_MODEL_SIZE", "ASR_LANGUAGE", "ASR_WORKERS", "ASR_CPU_THREADS",
            "ASR_BEAM_SIZE", "VAD_FRAME_MS", "VAD_SILENCE_MS", "VAD_AGGRESSIVENESS", "TTS_LEAD_MS", "LLM_BASE_URL",
            "TTS_BASE_URL")
    return {key: masked[key] for key in keys}


# -- output -------------------------------------------------------------------------------------------------


def render_markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    s = results["summary"]
    cfg = results["server_settings"]
    ai = (f"fake LLM TTFT {args.llm_ttft_ms:g} ms at {args.llm_tokens_per_s:g} tokens/s, fake TTS"
          if not args.url else f"LLM {cfg['LLM_BASE_URL'] or 'offline'}, TTS {cfg['TTS_BASE_URL'] or 'piper'}")
    title = (f"## Latency: end of speech → first reply audio — {s['turns_ok']}/{s['turns']} turns, "
             f"{args.protocol}, {results['server_mode']} server, ASR {cfg['ASR_MODEL_SIZE']} {cfg['ASR_ENGINE']}"
             f"{' speculative' if cfg['ASR_SPECULATIVE'] else ''}, {ai}")

    def row(label: str, p: dict[str, Any]) -> list[str]:
        return [label, fmt(p["p50"]), fmt(p["p95"]), fmt(p["p99"]), str(p["n"])]

    stage_rows = [row(f"→ {label}", s["stages_ms"][name]) for name, label in STAGES]
    stage_rows.append(row("**→ first reply audio at the client (headline)**", s["headline_ms"]))
    component_rows = [row(label, s["components_ms"][name]) for name, label in COMPONENTS]
    component_rows.append(row("headline (end of speech → first audio at the client)", s["headline_ms"]))
    component_rows.append(row("**pipeline overhead (headline − critical path)**", s["overhead_ms"]))
    turn_rows = []
    for t in results["turns"]:
        turn_rows.append([t["clip_id"], fmt(t["headline_ms"]), fmt(t["stages_ms"].get("asr_done")),
                          fmt(t["asr_ms"]), fmt(t["overhead_ms"]),
                          (t["transcript"] or t["failure"] or "").replace("\n", " ")[:48]])
    method = ", ".join(s["headline_method"]) or "-"
    check = s["same_clock_minus_device_side_ms"]
    notes = [f"Headline method: {method}."]
    if check["n"]:
        notes.append(f"Cross-check, same clock − device side: p50 {fmt(check['p50'], 1)} ms, "
                     f"max |Δ| {fmt(max(abs(check['min']), abs(check['max'])), 1)} ms.")
    return "\n".join([
        title, "",
        markdown_table(["from the end of speech (server VAD mark) to …", "p50 ms", "p95 ms", "p99 ms", "n"],
                       stage_rows),
        "",
        markdown_table(["component, measured alone on the same clips", "p50 ms", "p95 ms", "p99 ms", "n"],
                       component_rows),
        "", " ".join(notes), "",
        markdown_table(["clip", "headline ms", "→ ASR done ms", "ASR alone ms", "overhead ms", "heard"], turn_rows,
                       align="lrrrrl"),
    ])


def plot(results: dict[str, Any], path: Path) -> None:
    """Per-turn distribution of every stage and component, one row each, on one millisecond axis."""
    plt = pyplot()
    turns = [t for t in results["turns"] if t["ok"]]
    rows: list[tuple[str, list[float]]] = [
        (f"→ {label}", [t["stages_ms"][name] for t in turns if name in t["stages_ms"]]) for name, label in STAGES]
    rows.append(("→ first audio at client (headline)", [t["headline_ms"] for t in turns if t["headline_ms"] is not None]))
    rows += [(label.split(" (")[0], [t[name] for t in turns if t[name] is not None]) for name, label in COMPONENTS]
    rows.append(("pipeline overhead", [t["overhead_ms"] for t in turns if t["overhead_ms"] is not None]))
    rows = [(label, values) for label, values in rows if values]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.5))
    if rows:
        positions = list(range(len(rows), 0, -1))
        ax.boxplot([v for _, v in rows], positions=positions, orientation="horizontal", widths=0.6, showfliers=False)
        for pos, (_, values) in zip(positions, rows):
            jitter = [pos + 0.15 * ((i % 5) - 2) / 2 for i in range(len(values))]
            ax.scatter(values, jitter, s=10, alpha=0.6, color="C0")
        ax.set_yticks(positions, [label for label, _ in rows])
    ax.axvline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("milliseconds")
    ax.set_title(f"Latency per stage and component ({len(turns)} turns)")
    save_figure(fig, path)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server's WebSocket URL (default: an in-process server)")
    parser.add_argument("--protocol", choices=("native", "xiaoai", "xiaozhi"), default="native")
    parser.add_argument("--turns", type=int, default=12, help="measured turns, clips mixed zh/en (default 12)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured turns first (default 1)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of each component alone per turn; the median counts (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a reply (default 60)")
    add_common_options(parser)
    args = parser.parse_args(argv)
    if args.turns < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error("--turns and --repeat must be at least 1, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    return run_command("latency", args, run_latency, clip_count=args.turns, render=render_markdown, plot=plot,
                       passed=lambda results: results["summary"]["turns_ok"] > 0)


if __name__ == "__main__":
    raise SystemExit(main())
