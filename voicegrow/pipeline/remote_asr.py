"""Speech recognition by another server: any OpenAI-compatible ``/v1/audio/transcriptions`` (``ASR_BASE_URL``).

An edge replica then carries no Whisper model: utterances go as WAV over HTTP to a pool (another
VoiceGrow, speaches, vLLM, whisper.cpp's server). :class:`RemoteAsr` has :class:`~voicegrow.pipeline.asr.AsrService`'s
interface, so the session (its turns and its speculative transcription alike) does not know which it has.

Each attempt is bounded by ``ASR_REMOTE_TIMEOUT_S``, a failed one (unreachable, timeout, 5xx) is retried
``ASR_REMOTE_RETRIES`` times, and the whole is bounded by ``ASR_TIMEOUT``. Then, with
``ASR_REMOTE_FALLBACK=local``, the local model answers; with ``off`` the error reaches the turn, which
speaks an apology. Silence is screened here as the local engines do, and every answer goes through the
same guards (hallucinations, loops), whatever the remote is.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import httpx
import numpy as np
import trio

from voicegrow.aiauth import service_url
from voicegrow.pipeline.asr import (LIVE, SAMPLE_RATE, SILENCE_RMS, AsrError, AsrTimeout, Transcript, audio_rms,
                           drop_reason)
from voicegrow.audio import as_int16, wav_bytes
from voicegrow.language import detect_language

__all__ = ["RemoteAsr"]

log = logging.getLogger(__name__)

PATH = "/v1/audio/transcriptions"


class RemoteAsr:
    """Transcribes through ``base_url``; ``fallback`` (a local AsrService) answers when the remote cannot."""

    name = "remote"

    def __init__(self, http: httpx.AsyncClient, base_url: str, *, api_key: str = "", model: str = "whisper-1",
                 language: str = "auto", timeout_s: float = 30.0, attempt_timeout_s: float = 10.0,
                 retries: int = 1, fallback: Any = None, metrics: Any = None) -> None:
        self._http = http
        self.base_url = base_url
        self.url = service_url(base_url, PATH)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.language = language
        self.timeout_s = timeout_s
        self.attempt_timeout_s = attempt_timeout_s
        self.retries = retries
        self.fallback = fallback
        self._metrics = metrics
        self.workers = fallback.workers if fallback is not None else 0
        self._in_flight = 0
        self.last_latency_ms: float | None = None
        self.last_error: str | None = None
        self.last_ok_at: float | None = None

    @classmethod
    def from_settings(cls, settings: Any, http: httpx.AsyncClient, metrics: Any = None,
                      fallback: Any = None) -> RemoteAsr:
        return cls(http, settings.asr_base_url, api_key=settings.asr_api_key, model=settings.asr_remote_model,
                   language=settings.asr_language, timeout_s=settings.asr_timeout,
                   attempt_timeout_s=settings.asr_remote_timeout_s, retries=settings.asr_remote_retries,
                   fallback=fallback if settings.asr_remote_fallback == "local" else None, metrics=metrics)

    @property
    def queue_depth(self) -> int:
        return self._in_flight

    def queue_wait_s(self) -> float:
        """The local fallback's queue wait; the pool's own queue is the pool's to refuse at (its
        replicas run load-aware admission of their own, and a slow pool shows as remote latency)."""
        return self.fallback.queue_wait_s() if self.fallback is not None else 0.0

    @property
    def engine(self) -> Any:
        return self

    async def warm_up(self) -> None:
        """Nothing to load for the remote; a local fallback is loaded now so that it is ready when needed."""
        if self.fallback is not None:
            await self.fallback.warm_up()

    async def transcribe(self, pcm16k: bytes | np.ndarray, *, language: str | None = None,
                         priority: int = LIVE, timeout_s: float | None = None) -> Transcript:
        audio = pcm16k if isinstance(pcm16k, np.ndarray) else as_int16(pcm16k)
        lang = language or self.language
        duration_s = audio.shape[0] / SAMPLE_RATE
        started = time.perf_counter()
        if audio.size == 0 or audio_rms(audio) < SILENCE_RMS:
            return Transcript("", "" if lang == "auto" else lang, duration_s, 0.0, self.name, None, "silence")
        asked_timeout_s, timeout_s = timeout_s, self.timeout_s if timeout_s is None else timeout_s
        self._in_flight += 1
        try:
            with trio.move_on_after(timeout_s) as scope:
                text = await self._with_retries(wav_bytes(audio, SAMPLE_RATE), lang)
        except AsrError as exc:
            self.last_error = str(exc)
            self._count("error")
            if self.fallback is None:
                raise
            log.warning("remote ASR failed (%s); the local model answers", exc)
            return await self.fallback.transcribe(audio, language=language, priority=priority,
                                                  timeout_s=asked_timeout_s)
        finally:
            self._in_flight -= 1
        if scope.cancelled_caught:
            self.last_error = f"no answer within {timeout_s:g} s"
            self._count("timeout")
            if self.fallback is None:
                raise AsrTimeout(f"remote ASR took longer than {timeout_s:g} s")
            return await self.fallback.transcribe(audio, language=language, priority=priority,
                                                  timeout_s=asked_timeout_s)
        self.last_latency_ms = round((time.perf_counter() - started) * 1000, 1)
        self.last_ok_at, self.last_error = time.time(), None
        text = text.strip()
        detected = lang if lang != "auto" else detect_language(text, default="zh")
        reason = drop_reason(text)
        self._count("success" if reason is None else "empty")
        return Transcript("" if reason else text, detected, duration_s, time.perf_counter() - started, self.name,
                          None, reason)

    async def _with_retries(self, wav: bytes, lang: str) -> str:
        for attempt in range(self.retries + 1):
            try:
                return await self._attempt(wav, lang)
            except _Retryable as exc:
                if attempt == self.retries:
                    raise AsrError(f"remote ASR {self.url}: {exc}") from None
                log.info("remote ASR attempt %d failed (%s); retrying", attempt + 1, exc)
        raise AssertionError("unreachable")

    async def _attempt(self, wav: bytes, lang: str) -> str:
        data = {"model": self.model, "response_format": "json"}
        if lang != "auto":
            data["language"] = lang
        try:
            response = await self._http.post(self.url, data=data, files={"file": ("utterance.wav", wav, "audio/wav")},
                                             headers=self._headers, timeout=self.attempt_timeout_s)
        except httpx.TimeoutException:
            raise _Retryable(f"no answer within {self.attempt_timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code}")
        if response.status_code != 200:  # a 4xx (a wrong key, a refused file) does not get better by retrying
            raise AsrError(f"remote ASR {self.url}: HTTP {response.status_code}: {response.text[:200]}")
        try:
            text = response.json()["text"]
        except (ValueError, KeyError, TypeError):
            raise AsrError(f"remote ASR {self.url}: the answer has no JSON 'text'") from None
        if not isinstance(text, str):
            raise AsrError(f"remote ASR {self.url}: 'text' is not a string")
        return text

    def health(self) -> dict[str, Any]:
        status = "degraded" if self.last_error is not None else "ok"
        if self.last_error is not None and self.fallback is None:
            status = "down"
        info: dict[str, Any] = {
            "status": status, "engine": self.name, "remote": self.base_url, "model": self.model,
            "last_latency_ms": self.last_latency_ms, "last_error": self.last_error,
            "fallback": "local" if self.fallback is not None else "off", "queue_depth": self._in_flight,
            "workers": self.workers,
        }
        if self.last_error is not None:
            info["detail"] = f"remote ASR failing: {self.last_error}"
        return info

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.asr_requests.labels(outcome).inc()


class _Retryable(Exception):
    pass

