"""Speech to text for short spoken commands, and the trio-facing service that queues them.

Stock ``WhisperModel.transcribe()`` always encodes a 30 s mel window, so a 2–4 s command pays for
26 s of padding: on 2 cores that is most of the ~1 s it takes. :class:`FastEngine` drives the same
CTranslate2 model directly with a window fitted to the utterance, which is several times faster with
the same transcript (figures in ``bench/asr_window_sweep.py`` and ``python -m bench asr``), and hands
long utterances to :class:`StockEngine`, which segments them properly.

Both engines end in the same guards: Whisper invents text for silence and noise ("Thank you for
watching", "字幕由…"), loops on a phrase, or answers Mandarin in traditional characters; none of that
should reach the LLM as if the user had said it.

The model is loaded once per process (:func:`get_model`), the only global mutable state in the
project, and every transcription runs in a worker thread behind one :class:`PriorityLimiter` in
:class:`AsrService`: sessions are served first come, first served and never load a model of their own,
and batch work (the OpenAI audio API's uploads) takes a worker only when no live utterance is waiting.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import trio

from voicegrow.audio import as_int16
from voicegrow.pipeline.asr_models import ResolvedModel, resolve_model

if TYPE_CHECKING:
    from faster_whisper import WhisperModel

    from voicegrow.metrics import Metrics
    from voicegrow.settings import Settings

__all__ = [
    "AsrError",
    "AsrTimeout",
    "AsrService",
    "Engine",
    "FastEngine",
    "LIVE",
    "BATCH",
    "PriorityLimiter",
    "StockEngine",
    "Transcript",
    "WindowPolicy",
    "audio_rms",
    "build_asr_service",
    "drop_reason",
    "fit_window",
    "get_model",
    "is_hallucination",
    "repeated_span",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # samples per mel frame: 100 frames per second
FULL_WINDOW_FRAMES = 3000  # the 30 s window Whisper was trained on

# Window fitting, chosen by measurement: `python -m bench.asr_window_sweep` (base, int8, 2 threads,
# greedy, language forced), 30 fixture clips of 2.0–3.5 s (203–349 mel frames) and 12 joined clips of
# 8–28 s. Mean latency (s) / mean CER per language; the machine was shared (load average 3–5 on 2
# cores), so latencies are inflated alike for all rows; CERs are deterministic and were identical in
# two runs.
#
#   A. window floor, no padding     zh lat   zh CER   en lat   en CER   en dropped (loops)
#      stock transcribe()           1.343    0.106    1.335    0.024    0
#      floor 0 (= utterance)        0.217    0.317    0.422    1.050    16 of 20
#      floor 400                    0.218    0.154    0.312    0.540    7
#      floor 600                    0.308    0.167    0.318    0.224    3
#      floor 800                    0.329    0.121    0.275    0.084    1
#      floor 900                    0.359    0.136    0.294    0.087    1
#      floor 1000                   0.357    0.123    0.308    0.032    0
#      floor 1200                   0.388    0.119    0.343    0.034    0
#      floor 1500                   0.477    0.123    0.428    0.032    0
#      floor 3000 (= stock window)  1.166    0.106    1.228    0.024    0
#   B. padding without a floor: pad 100 / 200 / 500 -> en CER 0.474 / 0.424 / 0.139: trailing
#      silence does not replace a floor; what English needs is a window of ~10 s in total.
#   C. joined clips (floor 1000): CER identical to stock for every padding (0, 100, 500) up to
#      19.7 s; at 25.0 s the fast path lost a word (zh 0.037 vs 0.025), and from 25 s on its window
#      nears 30 s so the gain shrinks (27.5 s: 1.64–1.84 s vs stock 1.78 s).
#
# Hence: floor 1000 frames (the smallest with no English loops and en CER within 0.01 of stock; zh is
# +0.017, one character on zh-04, which every window under 3000 frames gets wrong the same way);
# 100 frames (1 s) of padding as a margin for speech cut at the buffer's end (it costs nothing under
# the floor); rounded to 100 frames (fewer distinct encoder shapes); stock above 20 s.
WINDOW_FLOOR_FRAMES = 1000
WINDOW_PADDING_FRAMES = 100
WINDOW_ROUND_FRAMES = 100
MAX_FAST_SECONDS = 20.0

#: Decoder budget: a bound on the output keeps a looping decoder from running to 448 tokens.
TOKENS_PER_SECOND = 15
MIN_NEW_TOKENS = 24
MAX_DECODER_TOKENS = 448

#: Whisper's own "this was silence" test: both must hold (transcribe()'s defaults).
NO_SPEECH_PROB = 0.6
LOW_AVG_LOGPROB = -1.0

#: int16 RMS under which audio is treated as silence without running the model (about -64 dBFS;
#: a quiet room through a speaker's microphone measures well above it).
SILENCE_RMS = 20.0

ZH_PROMPT = "以下是普通话的句子。"

#: Temperature fallback (``transcribe()``'s defaults): a greedy or beam result this unlikely or this
#: repetitive is decoded again by sampling at each further temperature, and the best result is kept.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
FALLBACK_LOG_PROB = -1.0
FALLBACK_COMPRESSION_RATIO = 2.4
FALLBACK_BEST_OF = 5

ENGINE_NAMES = ("fast", "stock")


class AsrError(Exception):
    """A transcription failed; ``code`` is what a client or the admin API sees."""

    code = "asr_error"


class AsrTimeout(AsrError):
    """The utterance was not transcribed (queue wait included) within ``ASR_TIMEOUT``."""

    code = "asr_timeout"


@dataclasses.dataclass(frozen=True)
class Transcript:
    """What was heard. When a guard rejected the model's output, ``text`` is "" and ``dropped`` says why."""

    text: str
    language: str
    duration_s: float
    elapsed_s: float
    engine: str
    no_speech_prob: float | None = None
    dropped: str | None = None
    avg_logprob: float | None = None


class Engine(Protocol):
    """A blocking transcriber; :class:`AsrService` runs it in a worker thread."""

    name: str

    def transcribe(self, pcm16k: np.ndarray, language: str | None = None) -> Transcript: ...


# --------------------------------------------------------------------------------------------------
# The process-wide model cache.

_models: dict[tuple[str, str, str, int, int], WhisperModel] = {}
_models_lock = threading.Lock()


def get_model(resolved: ResolvedModel, device: str = "cpu", compute_type: str = "int8",
              cpu_threads: int = 0, num_workers: int = 1) -> WhisperModel:
    """The one ``WhisperModel`` for these parameters in this process, loaded on first call.

    Thread-safe; the lock is held while loading so that two sessions arriving together do not load
    two copies (the memory growth other voice servers suffered from).
    """
    key = (resolved.path, device, compute_type, cpu_threads, num_workers)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            from faster_whisper import WhisperModel

            started = time.perf_counter()
            model = WhisperModel(resolved.path, device=device, compute_type=compute_type,
                                 cpu_threads=cpu_threads, num_workers=num_workers, local_files_only=True)
            log.info("loaded ASR model %s (%s) from %s in %.2f s", resolved.name, resolved.source,
                     resolved.path, time.perf_counter() - started)
            _models[key] = model
        return model


# --------------------------------------------------------------------------------------------------
# Pure helpers: window fitting and guards.

@dataclasses.dataclass(frozen=True)
class WindowPolicy:
    """How the fast engine sizes its mel window, and when it gives an utterance to the stock engine."""

    floor_frames: int = WINDOW_FLOOR_FRAMES
    padding_frames: int = WINDOW_PADDING_FRAMES
    round_frames: int = WINDOW_ROUND_FRAMES
    cap_frames: int = FULL_WINDOW_FRAMES
    max_fast_s: float = MAX_FAST_SECONDS

    def frames_for(self, n_frames: int) -> int:
        return fit_window(n_frames, floor=self.floor_frames, padding=self.padding_frames,
                          round_to=self.round_frames, cap=self.cap_frames)

    def use_fast(self, duration_s: float) -> bool:
        """The fast path only for utterances it measurably handles as well as stock, and that fit."""
        return duration_s <= self.max_fast_s and duration_s * SAMPLE_RATE / HOP_LENGTH < self.cap_frames


def fit_window(n_frames: int, *, floor: int, padding: int, round_to: int, cap: int) -> int:
    """Encoder window for an utterance of ``n_frames`` mel frames: padded, rounded up, floored, capped.

    Always even (the encoder's convolution has stride 2) when ``round_to`` is even.
    """
    if n_frames < 0 or floor < 0 or padding < 0 or round_to < 1 or cap < 1:
        raise ValueError("fit_window needs non-negative frames, floor, padding and positive round_to, cap")
    wanted = math.ceil((n_frames + padding) / round_to) * round_to
    return min(max(wanted, floor), cap)


def audio_rms(pcm: np.ndarray) -> float:
    """Root mean square in int16 units (float input in [-1, 1] is scaled to match)."""
    if pcm.size == 0:
        return 0.0
    x = pcm.astype(np.float64)
    if pcm.dtype.kind == "f":
        x *= 32768.0
    return float(np.sqrt(np.mean(x * x)))


def _normalize_for_match(text: str) -> str:
    """Lower case, no spaces or punctuation, simplified Chinese: how hallucinations are compared."""
    text = _t2s(unicodedata.normalize("NFKC", text)).lower()
    return "".join(ch for ch in text if not (ch.isspace() or unicodedata.category(ch)[0] in "PSZ"))


#: Whole outputs that Whisper produces for silence, noise or music (from the subtitles it was trained
#: on), compared after :func:`_normalize_for_match`. Short and exact, so a user who really says
#: "thank you" is still heard.
HALLUCINATIONS = frozenset(_n for _n in (
    "谢谢观看", "谢谢大家观看", "感谢观看", "谢谢收看", "谢谢大家", "谢谢观看下次见", "请订阅",
    "请不吝点赞 订阅 转发 打赏支持明镜与点点栏目", "中文字幕", "优优独播剧场", "字幕",
    "thank you for watching", "thanks for watching", "thank you for watching!", "thanks for watching!",
    "please subscribe", "subscribe", "you", "bye", "bye bye", "thank you so much for watching",
    "subtitles by the amara.org community",
))

#: Fragments that never occur in a spoken command, only in subtitle credits.
HALLUCINATION_FRAGMENTS = (
    "字幕由", "字幕提供", "字幕志愿者", "amaraorg", "明镜与点点", "点赞订阅", "订阅转发",
    "subscribetomychannel", "likeandsubscribe", "ご視聴ありがとうございました",
)


@functools.cache
def _hallucination_keys() -> tuple[frozenset[str], tuple[str, ...]]:
    return (frozenset(_normalize_for_match(h) for h in HALLUCINATIONS),
            tuple(_normalize_for_match(f) or f for f in HALLUCINATION_FRAGMENTS))


def is_hallucination(text: str) -> bool:
    """True for the well-known phrases Whisper emits when there is no speech."""
    key = _normalize_for_match(text)
    if not key:
        return False
    exact, fragments = _hallucination_keys()
    return key in exact or any(f in key for f in fragments)


def repeated_span(text: str, *, max_unit: int = 64) -> tuple[str, int] | None:
    """The first unit that repeats back to back too often to be speech, with its count, else None.

    The thresholds fall with the unit's length, so "no no no" or "哈哈哈" pass but a decoder stuck in
    a loop does not: a unit of 1 character 8 times, of 2–3 characters 5 times, longer ones 4 times
    (on the text without spaces, so that word and character scripts are treated alike). Runs of
    digits are numbers, not loops.
    """
    s = re.sub(r"\s+", "", text)
    codes = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)
    for unit in range(1, min(max_unit, len(s) // 2) + 1):
        need = 8 if unit == 1 else 5 if unit <= 3 else 4
        span = unit * (need - 1)  # s[i] == s[i + unit] for this many i in a row: `need` copies
        if unit + span > len(s):
            break
        same = np.concatenate(([0], (codes[:-unit] == codes[unit:]).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(same))
        starts, ends = edges[::2], edges[1::2]
        for run in np.flatnonzero(ends - starts >= span):
            start = int(starts[run])
            piece = s[start:start + unit]
            if not piece.isdigit():  # "100000000" or a phone number is not a loop
                return piece, int(ends[run] - start) // unit + 1
    return None


def drop_reason(text: str, *, no_speech_prob: float | None = None,
                avg_logprob: float | None = None, no_speech_threshold: float | None = NO_SPEECH_PROB,
                prompt: str | None = None) -> str | None:
    """Why this output must not be treated as speech ("empty", "no_speech", ...), or None to keep it.

    ``no_speech_threshold`` None: never judge by Whisper's no-speech probability. ``prompt``: the
    initial prompt the decoder was given; that prompt given back whole is a hallucination too (in fan
    or white noise at 10 dB, ``base`` answered 一加一等于几 with the Chinese prompt)."""
    normalized = _normalize_for_match(text)
    if not normalized:
        return "empty"
    if prompt and normalized == _normalize_for_match(prompt):
        return "hallucination"
    if (no_speech_threshold is not None and no_speech_prob is not None and avg_logprob is not None
            and no_speech_prob > no_speech_threshold and avg_logprob < LOW_AVG_LOGPROB):
        return "no_speech"
    if is_hallucination(text):
        return "hallucination"
    if repeated_span(text) is not None:
        return "repetition"
    return None


@functools.cache
def _t2s_converter() -> Any:
    """OpenCC's t2s tables, read on first use (part of the process-wide model cache, in effect)."""
    import opencc

    return opencc.OpenCC("t2s")


def _t2s(text: str) -> str:
    """Traditional to simplified Chinese (OpenCC t2s); a no-op on text without Han characters."""
    if not any("\u3400" <= ch <= "\u9fff" for ch in text):
        return text
    return str(_t2s_converter().convert(text))


def _as_float_audio(pcm: np.ndarray | bytes) -> np.ndarray:
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        pcm = np.frombuffer(pcm, dtype="<i2")
    if pcm.ndim != 1:
        raise ValueError(f"expected mono audio as a 1-D array, got shape {pcm.shape}")
    if pcm.dtype.kind == "f":
        return pcm.astype(np.float32, copy=False)
    if pcm.dtype != np.int16:
        raise ValueError(f"expected int16 PCM or float32 audio, got {pcm.dtype}")
    return pcm.astype(np.float32) / 32768.0


def _finish(text: str, language: str, duration_s: float, started: float, engine: str,
            no_speech_prob: float | None, avg_logprob: float | None, *,
            no_speech_threshold: float | None = NO_SPEECH_PROB, prompt: str | None = None) -> Transcript:
    """The common end of both engines: simplified Chinese, then the guards."""
    text = text.strip()
    if language == "zh":
        text = _t2s(text)
    reason = drop_reason(text, no_speech_prob=no_speech_prob, avg_logprob=avg_logprob,
                         no_speech_threshold=no_speech_threshold, prompt=prompt)
    if reason is not None:
        log.debug("ASR output dropped (%s): %r", reason, text)
        text = ""
    return Transcript(text, language, duration_s, time.perf_counter() - started, engine, no_speech_prob,
                      reason, avg_logprob)


def _check_language(language: str) -> str:
    if language != "auto" and not (2 <= len(language) <= 3 and language.isalpha()):
        raise ValueError(f"language must be a code such as 'zh' or 'en', or 'auto'; got {language!r}")
    return language


# --------------------------------------------------------------------------------------------------
# Engines.

class _ScreenedEngine:
    """The common front of both engines: language check, and silence answered without the model."""

    name: str
    language: str
    silence_rms: float

    def transcribe(self, pcm16k: np.ndarray, language: str | None = None) -> Transcript:
        started = time.perf_counter()
        lang = _check_language(language or self.language)
        duration_s = pcm16k.shape[0] / SAMPLE_RATE
        if pcm16k.size == 0 or audio_rms(pcm16k) < self.silence_rms:
            return Transcript("", "" if lang == "auto" else lang, duration_s, time.perf_counter() - started,
                              self.name, None, "silence")
        return self._transcribe(pcm16k, lang, duration_s, started)

    def _transcribe(self, pcm16k: np.ndarray, lang: str, duration_s: float, started: float) -> Transcript:
        raise NotImplementedError


class StockEngine(_ScreenedEngine):
    """faster-whisper's own ``transcribe()``: the reference, and the path for long utterances."""

    name = "stock"

    def __init__(self, model: WhisperModel, language: str = "zh", beam_size: int = 1, *,
                 silence_rms: float = SILENCE_RMS, resolved: ResolvedModel | None = None,
                 prompts: dict[str, str] | None = None) -> None:
        self.model = model
        self.language = _check_language(language)
        self.beam_size = beam_size
        self.silence_rms = silence_rms
        self.resolved = resolved
        self.prompts = {"zh": ZH_PROMPT} if prompts is None else dict(prompts)  # initial_prompt per language

    def _transcribe(self, pcm16k: np.ndarray, lang: str, duration_s: float, started: float) -> Transcript:
        audio = _as_float_audio(pcm16k)
        segments, info = self.model.transcribe(
            audio,
            language=None if lang == "auto" else lang,
            beam_size=self.beam_size,
            vad_filter=False,
            condition_on_previous_text=False,
            initial_prompt=self.prompts.get(lang) or None,
        )
        segments = list(segments)
        text = "".join(s.text for s in segments)
        no_speech = max((s.no_speech_prob for s in segments), default=None)
        # transcribe() already skips segments that are silence by Whisper's own test; what remains
        # is judged on its mean log probability like the fast engine's single segment.
        avg_logprob = min((s.avg_logprob for s in segments), default=None)
        return _finish(text, info.language, duration_s, started, self.name, no_speech, avg_logprob,
                       prompt=self.prompts.get(lang))


class FastEngine(_ScreenedEngine):
    """Encodes a window fitted to the utterance instead of 30 s, then greedy (or small-beam) decoding.

    The prompt is what ``transcribe()`` would build without timestamps: (``<|startofprev|>`` + the
    Chinese initial prompt), ``<|startoftranscript|>``, language, ``<|transcribe|>``,
    ``<|notimestamps|>``. ``candidate_languages`` limits what ``auto`` may detect (for example
    ``("zh", "en")``, so that accented Mandarin is not transcribed as Japanese).

    Decoding levers (the defaults are what the server runs; ``python -m bench room --asr`` measures
    the others in noise): ``temperatures`` beyond the first decode again by sampling when a result is
    unlikely or repetitive (``FALLBACK_*``, as ``transcribe()`` does); ``prompts`` is the previous-text
    prompt per language (``initial_prompt``); ``no_speech_threshold`` None keeps output Whisper
    itself would call silence.
    """

    name = "fast"

    def __init__(self, model: WhisperModel, language: str = "zh", beam_size: int = 1, *,
                 window: WindowPolicy = WindowPolicy(), silence_rms: float = SILENCE_RMS,
                 candidate_languages: Sequence[str] | None = None,
                 stock: StockEngine | None = None, resolved: ResolvedModel | None = None,
                 temperatures: Sequence[float] = (0.0,), prompts: dict[str, str] | None = None,
                 no_speech_threshold: float | None = NO_SPEECH_PROB) -> None:
        self.model = model
        self.language = _check_language(language)
        self.beam_size = beam_size
        self.window = window
        self.temperatures = tuple(temperatures) or (0.0,)
        self.prompts = {"zh": ZH_PROMPT} if prompts is None else dict(prompts)
        self.no_speech_threshold = no_speech_threshold
        self.silence_rms = silence_rms
        self.candidate_languages = tuple(candidate_languages) if candidate_languages else None
        self.stock = stock or StockEngine(model, language, beam_size, silence_rms=silence_rms,
                                          resolved=resolved, prompts=prompts)
        self.resolved = resolved
        self._tokenizers: dict[str, Any] = {}
        self._prompts: dict[str, list[int]] = {}
        self._suppress: tuple[int, ...] | None = None
        self._lock = threading.Lock()

    def _transcribe(self, pcm16k: np.ndarray, lang: str, duration_s: float, started: float) -> Transcript:
        if not self.window.use_fast(duration_s):
            return self.stock.transcribe(pcm16k, lang)
        audio = _as_float_audio(pcm16k)
        features = self.model.feature_extractor(audio)  # (n_mels, frames); zero-padded like stock
        frames = self.window.frames_for(features.shape[-1])
        window = np.zeros((1, features.shape[0], frames), dtype=np.float32)
        used = min(frames, features.shape[-1])
        window[0, :, :used] = features[:, :used]

        import ctranslate2

        encoded = self.model.model.encode(ctranslate2.StorageView.from_array(window), to_cpu=False)
        lang = self._language_for(encoded, lang)
        prompt = self._prompt(lang)
        # CTranslate2 counts the prompt in max_length (as faster-whisper's max_new_tokens does).
        max_length = min(MAX_DECODER_TOKENS,
                         len(prompt) + MIN_NEW_TOKENS + math.ceil(duration_s * TOKENS_PER_SECOND))
        tried: list[tuple[float, str, float]] = []  # (avg_logprob, text, no_speech_prob) of each decode
        for temperature in self.temperatures:
            sampling = ({"beam_size": 1, "num_hypotheses": FALLBACK_BEST_OF, "sampling_topk": 0,
                         "sampling_temperature": temperature} if temperature > 0 else {"beam_size": self.beam_size})
            result = self.model.model.generate(
                encoded, [prompt],
                max_length=max_length,
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=list(self._suppressed(lang)),
                **sampling,
            )[0]
            tokens = result.sequences_ids[0]
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1) if tokens else float("-inf")
            tried.append((avg_logprob, self._tokenizer(lang).decode(tokens), float(result.no_speech_prob)))
            if len(self.temperatures) == 1 or not self._needs_fallback(*tried[-1]):
                break
        else:
            tried.sort(key=lambda t: t[0])  # nothing passed: the likeliest, as transcribe() keeps
        avg_logprob, text, no_speech = tried[-1]
        return _finish(text, lang, duration_s, started, self.name, no_speech,
                       None if avg_logprob == float("-inf") else avg_logprob,
                       no_speech_threshold=self.no_speech_threshold, prompt=self.prompts.get(lang))

    def _needs_fallback(self, avg_logprob: float, text: str, no_speech_prob: float) -> bool:
        """``transcribe()``'s test: unlikely or repetitive, unless Whisper calls it silence."""
        from faster_whisper.transcribe import get_compression_ratio

        if (self.no_speech_threshold is not None and no_speech_prob > self.no_speech_threshold
                and avg_logprob < FALLBACK_LOG_PROB):
            return False  # silence: another temperature would only invent words
        return avg_logprob < FALLBACK_LOG_PROB or get_compression_ratio(text.strip()) > FALLBACK_COMPRESSION_RATIO

    def _language_for(self, encoded: Any, lang: str) -> str:
        if not self.model.model.is_multilingual:
            return "en"
        if lang != "auto":
            return lang
        ranked = self.model.model.detect_language(encoded)[0]
        for token, _prob in ranked:
            code = token[2:-2]
            if self.candidate_languages is None or code in self.candidate_languages:
                return code
        return ranked[0][0][2:-2]

    def _tokenizer(self, lang: str) -> Any:
        with self._lock:
            tokenizer = self._tokenizers.get(lang)
            if tokenizer is None:
                from faster_whisper.tokenizer import Tokenizer

                multilingual = self.model.model.is_multilingual
                tokenizer = Tokenizer(self.model.hf_tokenizer, multilingual, task="transcribe",
                                      language=lang if multilingual else None)
                self._tokenizers[lang] = tokenizer
            return tokenizer

    def _prompt(self, lang: str) -> list[int]:
        prompt = self._prompts.get(lang)
        if prompt is None:
            tokenizer = self._tokenizer(lang)
            prompt = []
            if self.prompts.get(lang):
                prompt = [tokenizer.sot_prev, *tokenizer.encode(" " + self.prompts[lang])]
            prompt += [*tokenizer.sot_sequence, tokenizer.no_timestamps]
            self._prompts[lang] = prompt
        return prompt

    def _suppressed(self, lang: str) -> tuple[int, ...]:
        """``suppress_tokens=[-1]`` expanded as ``transcribe()`` does (symbols and special tokens)."""
        if self._suppress is None:
            from faster_whisper.transcribe import get_suppressed_tokens

            self._suppress = tuple(get_suppressed_tokens(self._tokenizer(lang), [-1]) or ())
        return self._suppress


# --------------------------------------------------------------------------------------------------
# The trio side.

EngineFactory = Callable[[], Engine]

#: Priorities of :meth:`AsrService.transcribe`: a speaker's turn, then uploaded files.
LIVE = 0
BATCH = 1


class PriorityLimiter:
    """A capacity limiter with two queues: a free slot goes to the oldest live waiter, and to a batch
    waiter only when no live one waits. FIFO within each priority.

    A batch transcription already running is never preempted (Whisper cannot be paused), so a live
    turn waits at most for the work in progress, never for the batch queue behind it. Lanes
    (:meth:`lane`) give ``trio.to_thread.run_sync`` the limiter interface at one priority.
    """

    def __init__(self, total_tokens: int) -> None:
        if total_tokens < 1:
            raise ValueError("total_tokens must be at least 1")
        self.total_tokens = total_tokens
        self._borrowers: set[object] = set()
        self._waiting: tuple[dict[object, trio.Event], ...] = ({}, {})  # insertion-ordered per priority

    @property
    def borrowed_tokens(self) -> int:
        return len(self._borrowers)

    def waiting(self, priority: int) -> int:
        return len(self._waiting[priority])

    async def acquire_on_behalf_of(self, borrower: object, priority: int = LIVE) -> None:
        queue = self._waiting[priority]
        ahead = any(self._waiting[p] for p in range(priority + 1))
        if not ahead and len(self._borrowers) < self.total_tokens:
            self._borrowers.add(borrower)
            await trio.lowlevel.checkpoint()
            return
        granted = queue[borrower] = trio.Event()
        try:
            await granted.wait()
        except BaseException:
            if queue.pop(borrower, None) is None:  # granted and cancelled at once: hand the slot on
                self.release_on_behalf_of(borrower)
            raise

    def release_on_behalf_of(self, borrower: object) -> None:
        self._borrowers.remove(borrower)
        while len(self._borrowers) < self.total_tokens:
            queue = next((q for q in self._waiting if q), None)
            if queue is None:
                return
            borrower, granted = next(iter(queue.items()))
            del queue[borrower]
            self._borrowers.add(borrower)
            granted.set()

    def lane(self, priority: int) -> _Lane:
        return _Lane(self, priority)


@dataclasses.dataclass(frozen=True)
class _Lane:
    limiter: PriorityLimiter
    priority: int

    async def acquire_on_behalf_of(self, borrower: object) -> None:
        await self.limiter.acquire_on_behalf_of(borrower, self.priority)

    def release_on_behalf_of(self, borrower: object) -> None:
        self.limiter.release_on_behalf_of(borrower)


class AsrService:
    """Queues utterances from every session onto a few worker threads, first come first served.

    ``engine`` may be a ready engine or a factory that builds one (loading the model); the factory
    runs in a thread on :meth:`warm_up` or on the first request, never at import or construction.
    ``timeout_s`` covers the wait in the queue as well as the work: an answer later than that is no
    use to someone standing at a speaker. A request cancelled before a worker took it never runs; one
    cancelled while running is abandoned, and its thread keeps its worker slot until it ends, so the
    CPU is never oversubscribed.
    """

    def __init__(self, engine: Engine | EngineFactory, *, workers: int = 1, timeout_s: float = 30.0,
                 metrics: Metrics | None = None) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if hasattr(engine, "transcribe"):
            self._engine: Engine | None = engine  # type: ignore[assignment]
            self._factory: EngineFactory | None = None
        else:
            self._engine = None
            self._factory = engine  # type: ignore[assignment]
        self.workers = workers
        self.timeout_s = timeout_s
        self._metrics = metrics
        self._limiter = PriorityLimiter(workers)
        self._load_lock = trio.Lock()
        self._load_error: BaseException | None = None
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._live_queued: dict[_QueueTicket, float] = {}  # live utterances waiting, oldest first
        self._last_live_start = (-math.inf, 0.0)  # (when, after how long a wait) the last one was taken up

    @property
    def queue_depth(self) -> int:
        """Utterances accepted but not yet taken by a worker thread."""
        return self._waiting

    def queue_wait_s(self) -> float:
        """The wait a new speaker's utterance would meet now: how long the oldest live utterance still
        queued has waited, or, if longer, the wait of the last one taken up within the past 5 s (so that
        a queue drained by bursts does not read as empty between them). Batch requests do not count."""
        now = time.monotonic()
        with self._waiting_lock:
            oldest = next(iter(self._live_queued.values()), None)
            started_at, last_wait = self._last_live_start
        waiting = now - oldest if oldest is not None else 0.0
        return max(waiting, last_wait if now - started_at <= 5.0 else 0.0)

    @property
    def engine(self) -> Engine | None:
        return self._engine

    async def warm_up(self) -> None:
        """Load the model now, in a thread, so the first user does not wait for it."""
        await self._ensure_engine()

    async def transcribe(self, pcm16k: bytes | np.ndarray, *, language: str | None = None,
                         priority: int = LIVE, timeout_s: float | None = None) -> Transcript:
        """Transcribe one utterance (16 kHz mono, int16 samples or little-endian bytes).

        ``priority`` :data:`BATCH` queues behind every live utterance; ``timeout_s`` replaces
        ``ASR_TIMEOUT`` (an uploaded file may be minutes long)."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        audio = pcm16k if isinstance(pcm16k, np.ndarray) else as_int16(pcm16k)
        try:
            engine = await self._ensure_engine()
        except Exception:
            self._count("error")
            raise
        ticket = _QueueTicket(self._queue_changed, live=priority == LIVE)

        def work() -> Transcript | None:
            if not ticket.begin():  # cancelled between the limiter and this thread's start
                return None
            return engine.transcribe(audio, language)

        try:
            with trio.move_on_after(timeout_s) as scope:
                transcript = await trio.to_thread.run_sync(work, abandon_on_cancel=True,
                                                           limiter=self._limiter.lane(priority))
        except Exception as exc:
            self._count("error")
            if isinstance(exc, AsrError):
                raise
            raise AsrError(f"ASR failed: {type(exc).__name__}: {exc}") from exc
        finally:
            ticket.withdraw()
        if scope.cancelled_caught or transcript is None:
            self._count("timeout")
            raise AsrTimeout(f"ASR took longer than {timeout_s:g} s")
        self._count("success" if transcript.text else "empty")
        return transcript

    def health(self) -> dict[str, Any]:
        """For the admin API and readiness probes: loaded or not, which model, from where, and why."""
        engine = self._engine
        resolved: ResolvedModel | None = getattr(engine, "resolved", None)
        if self._load_error is not None:
            status = "error"
        elif engine is None:
            status = "loading" if self._load_lock.locked() else "cold"
        else:
            status = "degraded" if resolved is not None and resolved.note else "ok"
        info: dict[str, Any] = {
            "status": status,
            "engine": getattr(engine, "name", None),
            "model": resolved.name if resolved else None,
            "source": resolved.source if resolved else None,
            "path": resolved.path if resolved else None,
            "note": resolved.note if resolved else "",
            "workers": self.workers,
            "queue_depth": self._waiting,
        }
        if self._load_error is not None:
            info["error"] = {"code": getattr(self._load_error, "code", "asr_error"),
                             "message": str(self._load_error)}
            info["detail"] = f"model failed to load: {self._load_error}"
        elif info["note"]:
            info["detail"] = info["note"]
        return info

    async def _ensure_engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        async with self._load_lock:
            if self._engine is None:
                assert self._factory is not None
                try:
                    self._engine = await trio.to_thread.run_sync(self._factory)
                except Exception as exc:
                    self._load_error = exc
                    raise
                self._load_error = None
        return self._engine

    def _queue_changed(self, ticket: _QueueTicket, event: str) -> None:
        # Called from the trio thread and from the worker thread that picks the request up.
        now = time.monotonic()
        with self._waiting_lock:
            self._waiting += 1 if event == "joined" else -1
            depth = self._waiting
            if ticket.live:
                if event == "joined":
                    self._live_queued[ticket] = now
                else:
                    joined = self._live_queued.pop(ticket, now)
                    if event == "started":
                        self._last_live_start = (now, now - joined)
        if self._metrics is not None:
            self._metrics.asr_queue_depth.set(depth)

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.asr_requests.labels(outcome).inc()


class _QueueTicket:
    """One request's place in the queue: left exactly once, by its worker thread or by giving up."""

    def __init__(self, changed: Callable[[_QueueTicket, str], None], *, live: bool) -> None:
        self._changed = changed
        self.live = live
        self._lock = threading.Lock()
        self._state = "waiting"
        changed(self, "joined")

    def begin(self) -> bool:
        """Called by the worker thread: True if the request is still wanted."""
        with self._lock:
            if self._state != "waiting":
                return False
            self._state = "running"
        self._changed(self, "started")
        return True

    def withdraw(self) -> None:
        """Called by the caller when it stops waiting, for whatever reason; a no-op once begun."""
        with self._lock:
            if self._state != "waiting":
                return
            self._state = "withdrawn"
        self._changed(self, "withdrawn")


#: What ``ASR_LANGUAGE=auto`` may detect with the fast engine.
AUTO_LANGUAGES = ("zh", "en")


def build_asr_service(settings: Settings, metrics: Metrics | None = None, *,
                      allow_download: bool | None = None) -> AsrService:
    """The service the server runs, from ``ASR_*`` settings; nothing is loaded until first use.

    ``allow_download`` defaults to ``ASR_ALLOW_DOWNLOAD`` (off: the embedded default ``small`` then
    falls back to the packaged ``base`` model offline).
    """
    if allow_download is None:
        allow_download = settings.asr_allow_download
    workers = settings.asr_workers
    threads = settings.asr_cpu_threads or _default_cpu_threads(workers)
    engine_kind = settings.asr_engine
    if engine_kind not in ENGINE_NAMES:
        raise ValueError(f"ASR_ENGINE must be one of {', '.join(ENGINE_NAMES)}, got {engine_kind!r}")

    def factory() -> Engine:
        resolved = resolve_model(settings.asr_model_size, settings.asr_model_path,
                                 allow_download=allow_download)
        model = get_model(resolved, settings.asr_device, settings.asr_compute_type, threads,
                          num_workers=workers)
        prompts = {"zh": settings.asr_prompt_zh} if settings.asr_prompt_zh.strip() else {}
        stock = StockEngine(model, settings.asr_language, settings.asr_beam_size, resolved=resolved, prompts=prompts)
        if engine_kind == "stock":
            return stock
        # "auto" picks between the two languages the server can answer and speak in (accented
        # Mandarin is then never transcribed as Japanese or Cantonese).
        return FastEngine(model, settings.asr_language, settings.asr_beam_size, stock=stock,
                          resolved=resolved, candidate_languages=AUTO_LANGUAGES, prompts=prompts)

    return AsrService(factory, workers=workers, timeout_s=settings.asr_timeout, metrics=metrics)


def _default_cpu_threads(workers: int) -> int:
    """Split the cores between the workers: more threads than cores only makes every request slower."""
    import os

    return max(1, (os.cpu_count() or 1) // workers)

