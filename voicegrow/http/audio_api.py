"""The OpenAI audio API on the HTTP port: ``POST /v1/audio/transcriptions`` and ``POST /v1/audio/speech``.

Other software (and other VoiceGrow replicas, ``ASR_BASE_URL``) uses this server's speech recognition
and voices through the API that speaches, vLLM, LocalAI and whisper.cpp's server also speak, so the
unmodified ``openai`` client works against it. It is the speakers' own machinery: the one Whisper model
and its worker threads (:class:`~voicegrow.pipeline.asr.AsrService`, at batch priority, so a speaker's turn is
always served first) and the server's TTS engine.

Who may call it: with ``API_KEYS`` set, a bearer token that is one of those keys, or the admin
credential; with ``API_KEYS`` empty, the admin credential rules alone (``ADMIN_TOKEN``,
``ADMIN_ALLOW_FROM``). A wrong key is a guess for the shared :class:`~voicegrow.auth_throttle.AuthThrottle`.
Every error is OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}`` (docs/audio-api.md).
"""

from __future__ import annotations

import contextlib
import hmac
import io
import json
import logging
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import trio
from quart import Blueprint, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from voicegrow.admin_auth import Refusal
from voicegrow.pipeline.asr import BATCH, AsrError, AsrTimeout, Transcript
from voicegrow.auth_throttle import address_key
from voicegrow.http.api import admin_check, request_client
from voicegrow.language import detect_language
from voicegrow.pipeline.sentences import SentenceSplitter
from voicegrow.services import Services

__all__ = ["AUDIO_PATHS", "ApiError", "TRANSCRIPTION_PATH", "decode_audio", "format_transcript",
           "make_audio_blueprint", "wav_stream_header"]

log = logging.getLogger(__name__)

TRANSCRIPTION_PATH = "/v1/audio/transcriptions"
SPEECH_PATH = "/v1/audio/speech"
AUDIO_PATHS = frozenset({TRANSCRIPTION_PATH, SPEECH_PATH})

TRANSCRIPT_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
SPEECH_FORMATS = ("wav", "pcm", "mp3", "opus")
ASR_RATE = 16_000
_LANGUAGE_NAMES = {"zh": "chinese", "en": "english"}


class ApiError(Exception):
    """A request the API refuses; rendered as OpenAI renders its errors."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after_s = retry_after_s

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        response = jsonify(body)
        response.status_code = self.status
        if self.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="voicegrow"'
        if self.retry_after_s is not None:
            response.headers["Retry-After"] = str(self.retry_after_s)
        return response


# -- decoding and formatting (pure) -------------------------------------------------------------------------


def decode_audio(data: bytes, max_duration_s: float) -> np.ndarray:
    """Any file PyAV (FFmpeg) reads, as 16 kHz mono int16; decoding stops just past ``max_duration_s``
    so a huge or endless stream costs no more than the limit. Raises :class:`ApiError`."""
    import av

    limit = int(max_duration_s * ASR_RATE) + 1
    pieces: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.audio:
                raise ApiError(400, "the file has no audio stream", param="file", code="invalid_file_format")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=ASR_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pieces.append(out.to_ndarray().reshape(-1))
                    total += pieces[-1].size
                if total > limit:
                    break
            else:
                for out in resampler.resample(None):
                    pieces.append(out.to_ndarray().reshape(-1))
                    total += pieces[-1].size
    except ApiError:
        raise
    except (av.error.FFmpegError, ValueError, EOFError) as exc:
        raise ApiError(400, f"the file could not be decoded as audio ({exc})", param="file",
                       code="invalid_file_format") from None
    if total > limit:
        raise ApiError(400, f"the audio is longer than {max_duration_s:g} s (AUDIO_MAX_DURATION_S)",
                       param="file", code="audio_too_long")
    if total == 0:
        raise ApiError(400, "the file holds no audio samples", param="file", code="invalid_file_format")
    return np.concatenate(pieces).astype(np.int16, copy=False)


def _timestamp(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def format_transcript(transcript: Transcript, response_format: str, duration_s: float) -> tuple[str, str]:
    """The body and its media type. The engines decode one segment per utterance, so the subtitle
    formats and ``verbose_json`` carry one segment spanning the audio (none when nothing was heard)."""
    text = transcript.text
    if response_format == "json":
        return json.dumps({"text": text}, ensure_ascii=False), "application/json"
    if response_format == "text":
        return text, "text/plain; charset=utf-8"
    if response_format == "verbose_json":
        segments = []
        if text:
            segments.append({
                "id": 0, "seek": 0, "start": 0.0, "end": round(duration_s, 3), "text": text, "tokens": [],
                "temperature": 0.0, "avg_logprob": transcript.avg_logprob,
                "compression_ratio": round(len(text.encode()) / max(1, len(zlib.compress(text.encode()))), 3),
                "no_speech_prob": transcript.no_speech_prob,
            })
        body = {"task": "transcribe", "language": _LANGUAGE_NAMES.get(transcript.language, transcript.language),
                "duration": round(duration_s, 3), "text": text, "segments": segments}
        return json.dumps(body, ensure_ascii=False), "application/json"
    end_srt, end_vtt = _timestamp(duration_s, ","), _timestamp(duration_s, ".")
    if response_format == "srt":
        return (f"1\n00:00:00,000 --> {end_srt}\n{text}\n\n" if text else ""), "application/x-subrip"
    return "WEBVTT\n\n" + (f"00:00:00.000 --> {end_vtt}\n{text}\n\n" if text else ""), "text/vtt; charset=utf-8"


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (sizes 0xFFFFFFFF, as streaming TTS
    servers write it; players and :class:`~voicegrow.pipeline.tts.PcmStreamDecoder` read it)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) +
            b"data" + struct.pack("<I", unknown))


class _CompressedStream:
    """PCM in, MP3 or Ogg Opus bytes out as soon as the encoder has them (PyAV), for streaming."""

    def __init__(self, response_format: str, sample_rate: int) -> None:
        import av

        self._sink = io.BytesIO()
        self._container = av.open(self._sink, mode="w", format="mp3" if response_format == "mp3" else "ogg")
        rate = sample_rate
        if response_format == "opus" and rate not in (8000, 12000, 16000, 24000, 48000):
            rate = 24000  # Opus's own rates; the caller resamples to ``self.rate``
        self.rate = rate
        codec = "libmp3lame" if response_format == "mp3" else "libopus"
        self._stream = self._container.add_stream(codec, rate=rate, layout="mono")
        self._pts = 0

    def feed(self, pcm: bytes) -> bytes:
        import av

        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        if samples.size:
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate, frame.pts = self.rate, self._pts
            self._pts += samples.shape[1]
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._take()

    def close(self) -> bytes:
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return self._take()

    def _take(self) -> bytes:
        data = self._sink.getvalue()
        self._sink.seek(0)
        self._sink.truncate()
        return data


# -- the blueprint ------------------------------------------------------------------------------------------


def _auth_error(refusal: Refusal) -> ApiError:
    code = "invalid_api_key" if refusal.status == 401 else "rate_limit_exceeded"
    kind = "invalid_request_error" if refusal.status == 401 else "rate_limit_error"
    return ApiError(refusal.status, refusal.reason, code=code, kind=kind, retry_after_s=refusal.retry_after_s)


def make_audio_blueprint(services: Services) -> Blueprint:
    settings = services.settings
    keys = tuple(k.encode() for k in settings.api_key_list)
    blueprint = Blueprint("audio_api", __name__)
    decoding = trio.CapacityLimiter(2)  # FFmpeg decodes in threads; at most two uploads at a time

    def count(endpoint: str, outcome: str) -> None:
        services.metrics.audio_api_requests.labels(endpoint, outcome).inc()

    @blueprint.errorhandler(ApiError)
    async def api_error(exc: ApiError) -> Response:
        count("speech" if request.path == SPEECH_PATH else "transcriptions", exc.code or "error")
        return exc.response()

    @blueprint.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = "file_too_large" if exc.code == 413 else (exc.name or "error").lower().replace(" ", "_")
        message = (f"request body over {settings.audio_max_upload_bytes} bytes (AUDIO_MAX_UPLOAD_BYTES)"
                   if exc.code == 413 else exc.description or code)
        return await api_error(ApiError(exc.code or 400, message, code=code))

    @blueprint.before_request
    async def check_key() -> None:
        """An API key, or else the admin rule; the throttle's lock-out comes before either."""
        client = request_client(services.proxies)
        if keys:
            retry = services.auth_throttle.retry_after(address_key(client.host))
            scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
            presented = token.strip().encode("utf-8", "surrogateescape")
            if retry is None and scheme.lower() == "bearer" and any(
                    hmac.compare_digest(presented, key) for key in keys):
                return
        refusal = admin_check(services.admin_auth, client)
        if refusal is not None:
            raise _auth_error(refusal)

    @blueprint.post(TRANSCRIPTION_PATH)
    async def transcriptions() -> Response:
        files = await request.files
        form = await request.form
        upload = files.get("file")
        if upload is None:
            raise ApiError(400, "missing the audio 'file' (multipart/form-data)", param="file",
                           code="missing_required_parameter")
        if not form.get("model", "").strip():
            raise ApiError(400, "missing 'model' (any name: this server has one model)", param="model",
                           code="missing_required_parameter")
        response_format = form.get("response_format", "json")
        if response_format not in TRANSCRIPT_FORMATS:
            raise ApiError(400, f"response_format {response_format!r} is not supported: expected one of "
                           f"{', '.join(TRANSCRIPT_FORMATS)}", param="response_format", code="invalid_value")
        language = form.get("language", "").strip().lower() or None
        if language is not None and not (2 <= len(language) <= 3 and language.isalpha()):
            raise ApiError(400, f"language {language!r}: expected an ISO-639-1 code such as en or zh",
                           param="language", code="invalid_value")
        try:
            temperature = float(form.get("temperature", "0"))
        except ValueError:
            temperature = -1.0
        if not 0.0 <= temperature <= 1.0:
            raise ApiError(400, "temperature: expected a number from 0 to 1", param="temperature",
                           code="invalid_value")
        data = upload.read()
        if not data:
            raise ApiError(400, "the file is empty", param="file", code="invalid_file_format")
        pcm = await trio.to_thread.run_sync(decode_audio, data, settings.audio_max_duration_s,
                                            limiter=decoding)
        try:
            transcript = await services.asr.transcribe(pcm, language=language, priority=BATCH,
                                                       timeout_s=settings.audio_timeout_s)
        except AsrTimeout as exc:
            raise ApiError(503, f"{exc} (AUDIO_TIMEOUT_S)", code="timeout", kind="server_error") from None
        except AsrError as exc:
            raise ApiError(503, str(exc), code=exc.code, kind="server_error") from None
        body, mimetype = format_transcript(transcript, response_format, pcm.size / ASR_RATE)
        count("transcriptions", "ok")
        return Response(body, content_type=mimetype)

    @blueprint.post(SPEECH_PATH)
    async def speech() -> Response:
        payload = await request.get_json(silent=True)
        if not isinstance(payload, dict):
            raise ApiError(400, "expected a JSON object body", code="invalid_json")
        text = payload.get("input")
        if not isinstance(text, str) or not text.strip():
            raise ApiError(400, "input: expected non-empty text", param="input", code="missing_required_parameter")
        if len(text) > settings.audio_max_input_chars:
            raise ApiError(400, f"input is longer than {settings.audio_max_input_chars} characters "
                           "(AUDIO_MAX_INPUT_CHARS)", param="input", code="string_above_max_length")
        if not isinstance(payload.get("voice", ""), str):
            raise ApiError(400, "voice: expected a name", param="voice", code="invalid_value")
        response_format = payload.get("response_format") or "wav"
        if response_format not in SPEECH_FORMATS:
            raise ApiError(400, f"response_format {response_format!r} is not supported: expected one of "
                           f"{', '.join(SPEECH_FORMATS)}", param="response_format", code="invalid_value")
        speed = payload.get("speed", 1.0)
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not 0.25 <= speed <= 4.0:
            raise ApiError(400, "speed: expected a number from 0.25 to 4.0", param="speed", code="invalid_value")
        if speed != 1.0:
            raise ApiError(400, "speed: only 1.0 is supported (the voices speak at TTS_SPEAKING_RATE)",
                           param="speed", code="unsupported_value")
        return await _speech_response(services, text, response_format, count)

    return blueprint


async def _speech_response(services: Services, text: str, response_format: str, count: Any) -> Response:
    """Synthesize sentence by sentence and stream; an engine failure before the first audio is a 502,
    after it the stream ends early (the status is already sent)."""
    from voicegrow.audio import StreamResampler
    from voicegrow.pipeline.tts import TtsError

    tts = services.tts
    lang = detect_language(text, default="zh" if services.settings.asr_language == "zh" else "en")
    options = tts.splitter_options(lang) if hasattr(tts, "splitter_options") else {}
    splitter = SentenceSplitter(**options)
    sentences = [s for s in (*splitter.feed(text), *splitter.flush()) if s.strip()] or [text]

    async def pcm_chunks() -> AsyncIterator[bytes]:
        for sentence in sentences:
            async with contextlib.aclosing(tts.synthesize(sentence, lang)) as chunks:
                async for chunk in chunks:
                    if chunk:
                        yield chunk

    source = pcm_chunks()
    try:
        first = await source.__anext__()
    except StopAsyncIteration:
        await source.aclose()
        raise ApiError(502, "the voice produced no audio for this input", code="tts_empty",
                       kind="server_error") from None
    except TtsError as exc:
        await source.aclose()
        raise ApiError(502, f"speech synthesis failed: {exc}", code="tts_error", kind="server_error") from None
    rate = int(tts.output_rate)
    encoder = _CompressedStream(response_format, rate) if response_format in ("mp3", "opus") else None
    resampler = StreamResampler(rate, encoder.rate) if encoder is not None and encoder.rate != rate else None

    def encode(chunk: bytes) -> bytes:
        if encoder is None:
            return chunk
        if resampler is not None:
            chunk = resampler.process(chunk).astype('<i2').tobytes()
        return encoder.feed(chunk)

    async def body() -> AsyncIterator[bytes]:
        outcome = "ok"
        try:
            if response_format == "wav":
                yield wav_stream_header(rate)
            yield encode(first)
            async for chunk in source:
                yield encode(chunk)
            if encoder is not None:
                yield encoder.close()
        except TtsError as exc:
            outcome = "tts_error"
            log.warning("speech stream ended early: %s", exc)
        finally:
            await source.aclose()
            count("speech", outcome)

    media = {"wav": "audio/wav", "pcm": f"audio/L16; rate={rate}; channels=1", "mp3": "audio/mpeg",
             "opus": "audio/ogg; codecs=opus"}[response_format]
    return Response(body(), content_type=media, headers={"X-Sample-Rate": str(rate)})
