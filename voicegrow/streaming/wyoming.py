"""The Wyoming listener (``WYOMING_PORT``): VoiceGrow's ASR and TTS for Home Assistant's Assist.

Home Assistant's Wyoming integration connects over TCP, asks ``describe`` and gets ``info``, then
opens a connection per request: ``transcribe`` + ``audio-start`` / ``audio-chunk``… / ``audio-stop`` →
``transcript``; ``synthesize`` → ``audio-start`` / ``audio-chunk``… / ``audio-stop``; or the streaming
``synthesize-start`` / ``synthesize-chunk``… / ``synthesize-stop``, spoken sentence by sentence as the
text arrives, ended by ``synthesize-stopped``. The events are the ``wyoming`` package's own classes;
the framing is :mod:`voicegrow.protocol.wyoming` (the package's reader and writer are asyncio-only).

Every connection is its own trio task, so several clients are served at once (Wyoming's reference
servers take one request at a time). Recognition goes through the same :class:`~voicegrow.pipeline.asr.AsrService`
as the speakers (one model, the same worker threads, first come first served) and speech through the
same TTS engine. Bad input is answered with an ``error`` event; broken framing also closes that
connection; nothing a client sends reaches the listener or another connection.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import trio
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import AsrModel, AsrProgram, Attribution, Describe, Info, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from voicegrow import __version__
from voicegrow.pipeline.asr import AsrError
from voicegrow.audio import StreamResampler, to_mono_int16
from voicegrow.language import detect_language
from voicegrow.protocol.wyoming import WyomingDecoder, WyomingProtocolError, encode_event
from voicegrow.pipeline.sentences import SentenceSplitter
from voicegrow.pipeline.tts import TtsError

__all__ = ["WyomingServer", "describe_info"]

log = logging.getLogger(__name__)

ASR_RATE = 16000
LANGUAGES = ("zh", "en")
MAX_TEXT_CHARS = 5000  # one synthesize request, or one streamed request in total
IDLE_TIMEOUT_S = 300.0  # Home Assistant opens a connection per request; a silent one is a leak
AUDIO_CHUNK_SAMPLES = 2048  # per audio-chunk sent (~85 ms at 24 kHz)
MAX_CONNECTIONS = 64  # Home Assistant holds one or two; more is a misbehaving client on the network
_ATTRIBUTION = Attribution(name="VoiceGrow", url="https://github.com/voicegrow/voicegrow")


class _RequestError(Exception):
    """A request this connection cannot serve; answered with an ``error`` event, the connection stays."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _tts_voices(tts: Any) -> list[tuple[str, str, str]]:
    """(voice name, language, description) for each voice the TTS engine speaks with."""
    if hasattr(tts, "zh") and hasattr(tts, "en"):  # EmbeddedTts
        return [(getattr(tts.zh, "voice", "kokoro"), "zh", tts.zh.describe()),
                (Path(tts.en.model_path).name.removesuffix(".onnx"), "en", tts.en.describe())]
    if hasattr(tts, "voice_zh"):  # RemoteTts: the configured voices of the remote service
        return [(tts.voice_zh, "zh", "TTS_VOICE_ZH of the remote service"),
                (tts.voice_en, "en", "TTS_VOICE_EN of the remote service")]
    if hasattr(tts, "model_path"):  # PiperTts alone
        return [(Path(tts.model_path).name.removesuffix(".onnx"), "en", tts.describe())]
    return [(getattr(tts, "name", "default"), "en", "")]


def describe_info(services: Any) -> Info:
    """The ``info`` answer: the ASR model with its languages, the voices with theirs."""
    settings = services.settings
    model = services.asr.health().get("model") or settings.asr_model_path or settings.asr_model_size
    asr = AsrProgram(name="voicegrow", attribution=_ATTRIBUTION, installed=True,
                     description="VoiceGrow speech recognition (faster-whisper)", version=__version__,
                     models=[AsrModel(name=str(model), attribution=_ATTRIBUTION, installed=True,
                                      description=f"faster-whisper {model}", version=None,
                                      languages=list(LANGUAGES))])
    by_name: dict[str, TtsVoice] = {}
    for name, lang, description in _tts_voices(services.tts):
        if name in by_name:  # a remote service with one voice for both languages
            by_name[name].languages.append(lang)
            continue
        by_name[name] = TtsVoice(name=name, attribution=_ATTRIBUTION, installed=True,
                                 description=description or None, version=None, languages=[lang])
    tts = TtsProgram(name="voicegrow", attribution=_ATTRIBUTION, installed=True,
                     description="VoiceGrow speech synthesis", version=__version__,
                     voices=list(by_name.values()), supports_synthesize_streaming=True)
    return Info(asr=[asr], tts=[tts])


def _language(code: str | None) -> str | None:
    """``zh-CN`` → ``zh``; a language the server does not speak → None (detected per utterance)."""
    if not code:
        return None
    primary = code.split("-")[0].split("_")[0].lower()
    return primary if primary in LANGUAGES else None


class WyomingServer:
    def __init__(self, services: Any) -> None:
        self.services = services
        self.connections = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.services.settings
        listeners = await trio.open_tcp_listeners(s.wyoming_port, host=s.server_host or None)
        port = listeners[0].socket.getsockname()[1]
        log.info("Wyoming listening on port %d", port, extra={"wyoming_port": port})
        task_status.started(port)
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            if self.connections > MAX_CONNECTIONS:
                log.warning("Wyoming: over %d connections, one refused", MAX_CONNECTIONS)
                await stream.send_all(encode_event(Error(text=f"server busy: over {MAX_CONNECTIONS} connections",
                                                         code="busy").event()))
                return
            await _Connection(self.services, stream).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-answer
        except Exception:
            log.exception("Wyoming connection failed")
        finally:
            self.connections -= 1
            with contextlib.suppress(Exception):
                await stream.aclose()


class _AsrRequest:
    """One ``transcribe``: audio in any layout, converted to 16 kHz mono as it arrives."""

    def __init__(self, language: str | None, max_samples: int) -> None:
        self.language = language
        self.max_samples = max_samples
        self.parts: list[np.ndarray] = []
        self.samples = 0
        self.format: tuple[int, int, int] | None = None
        self.resampler: StreamResampler | None = None
        self.failed = False

    def set_format(self, rate: int, width: int, channels: int) -> None:
        if (rate, width, channels) == self.format:
            return
        if not (8000 <= rate <= 192000 and width in (1, 2, 3, 4) and 1 <= channels <= 8):
            raise _RequestError("bad_audio_format", f"unsupported audio: {rate} Hz, {width}-byte samples, "
                                                    f"{channels} channels")
        self._flush()
        self.format = (rate, width, channels)
        self.resampler = StreamResampler(rate, ASR_RATE)

    def add(self, chunk: AudioChunk) -> None:
        self.set_format(chunk.rate, chunk.width, chunk.channels)
        assert self.resampler is not None
        try:
            mono = to_mono_int16(chunk.audio, chunk.width, chunk.channels)
        except ValueError as exc:
            raise _RequestError("bad_audio", str(exc)) from None
        self._append(self.resampler.process(mono))

    def finish(self) -> np.ndarray:
        self._flush()
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int16)

    def _flush(self) -> None:
        if self.resampler is not None:
            self._append(self.resampler.flush())

    def _append(self, samples: np.ndarray) -> None:
        self.samples += len(samples)
        if self.samples > self.max_samples:
            raise _RequestError("audio_too_long", f"more than {self.max_samples / ASR_RATE:g} s of audio "
                                                  "(WYOMING_MAX_AUDIO_S)")
        if len(samples):
            self.parts.append(samples)


class _Connection:
    def __init__(self, services: Any, stream: trio.SocketStream) -> None:
        self.services = services
        self.settings = services.settings
        self.stream = stream
        self.decoder = WyomingDecoder(max_payload_bytes=self.settings.max_frame_bytes)
        self.asr: _AsrRequest | None = None
        self.streaming: _StreamedSynthesis | None = None  # between synthesize-start and synthesize-stop

    async def send(self, event: Event) -> None:
        await self.stream.send_all(encode_event(event))

    async def run(self) -> None:
        while True:
            data = None
            with trio.move_on_after(IDLE_TIMEOUT_S):
                data = await self.stream.receive_some(65536)
            if data is None:
                log.info("Wyoming connection idle for %g s: closed", IDLE_TIMEOUT_S)
                return
            if not data:
                return
            try:
                events = self.decoder.feed(data)
            except WyomingProtocolError as exc:
                await self.send(Error(text=str(exc), code=exc.code).event())
                return
            for event in events:
                try:
                    await self.handle(event)
                except _RequestError as exc:
                    log.info("Wyoming request refused: %s", exc, extra={"code": exc.code})
                    await self.send(Error(text=str(exc), code=exc.code).event())
                except (KeyError, TypeError, ValueError, AttributeError) as exc:  # an event missing its fields
                    await self.send(Error(text=f"bad {event.type} event: {type(exc).__name__}: {exc}",
                                          code="bad_event").event())

    async def handle(self, event: Event) -> None:
        kind = event.type
        if Describe.is_type(kind):
            await self.send(describe_info(self.services).event())
        elif Ping.is_type(kind):
            await self.send(Pong(text=Ping.from_event(event).text).event())
        elif Transcribe.is_type(kind):
            self.asr = self._new_asr(Transcribe.from_event(event).language)
        elif AudioStart.is_type(kind):
            start = AudioStart.from_event(event)
            self.asr = self.asr or self._new_asr(None)
            self._guard(self.asr.set_format, start.rate, start.width, start.channels)
        elif AudioChunk.is_type(kind):
            if self.asr is None:
                raise _RequestError("unexpected_event", "audio-chunk before transcribe / audio-start")
            self._guard(self.asr.add, AudioChunk.from_event(event))
        elif AudioStop.is_type(kind):
            request, self.asr = self.asr, None
            if request is None:
                raise _RequestError("unexpected_event", "audio-stop before transcribe / audio-start")
            if not request.failed:
                await self._transcribe(request)
        elif Synthesize.is_type(kind):
            if self.streaming is not None:
                return  # Home Assistant sends the whole text too, for servers that do not stream
            synth = Synthesize.from_event(event)
            lang = self._voice_language(synth.voice)
            text = self._text(synth.text)
            audio = _AudioOut(self.send, self.services.tts)
            try:
                await audio.speak(text, lang)
            finally:
                await audio.close()
        elif SynthesizeStart.is_type(kind):
            start = SynthesizeStart.from_event(event)
            self.streaming = _StreamedSynthesis(self._voice_language(start.voice),
                                                _AudioOut(self.send, self.services.tts))
        elif SynthesizeChunk.is_type(kind):
            if self.streaming is None:
                raise _RequestError("unexpected_event", "synthesize-chunk before synthesize-start")
            await self.streaming.feed(SynthesizeChunk.from_event(event).text)
        elif SynthesizeStop.is_type(kind):
            streamed, self.streaming = self.streaming, None
            if streamed is None:
                raise _RequestError("unexpected_event", "synthesize-stop before synthesize-start")
            try:
                await streamed.finish()
            finally:
                await self.send(SynthesizeStopped().event())
        else:
            log.debug("Wyoming event ignored", extra={"event_type": kind})

    # -- ASR

    def _new_asr(self, language: str | None) -> _AsrRequest:
        return _AsrRequest(_language(language), int(self.settings.wyoming_max_audio_s * ASR_RATE))

    def _guard(self, step: Any, *args: Any) -> None:
        """A refused piece of audio fails its whole request once; the rest of it is then dropped."""
        assert self.asr is not None
        if self.asr.failed:
            return
        try:
            step(*args)
        except _RequestError:
            self.asr.failed = True
            self.asr.parts.clear()
            raise

    async def _transcribe(self, request: _AsrRequest) -> None:
        pcm = request.finish()
        try:
            transcript = await self.services.asr.transcribe(pcm, language=request.language)
        except AsrError as exc:
            raise _RequestError(exc.code, str(exc)) from None
        except Exception as exc:  # the model failed to load: this request fails, the listener stays
            log.exception("Wyoming transcription failed")
            raise _RequestError("asr_error", f"ASR failed: {type(exc).__name__}") from None
        language = transcript.language or request.language or detect_language(transcript.text)
        await self.send(Transcript(text=transcript.text, language=language).event())

    # -- TTS

    def _text(self, text: str) -> str:
        if len(text) > MAX_TEXT_CHARS:
            raise _RequestError("text_too_long", f"more than {MAX_TEXT_CHARS} characters to speak")
        return text

    def _voice_language(self, voice: Any) -> str | None:
        if voice is None:
            return None
        if voice.name is not None:
            for name, lang, _ in _tts_voices(self.services.tts):
                if name == voice.name:
                    return lang
            raise _RequestError("unknown_voice", f"no voice named {voice.name!r} (see describe)")
        return _language(voice.language)



class _AudioOut:
    """One audio stream to the client: ``audio-start`` at the engine's rate (known once the first chunk
    exists: a remote service may answer WAV at its own rate), ``audio-chunk``s, one ``audio-stop``."""

    def __init__(self, send: Any, tts: Any) -> None:
        self.send, self.tts = send, tts
        self.rate: int | None = None
        self.resampler: StreamResampler | None = None

    async def speak(self, text: str, lang: str | None) -> None:
        lang = lang or detect_language(text)
        try:
            async with contextlib.aclosing(self.tts.synthesize(text, lang)) as chunks:
                async for chunk in chunks:
                    await self._emit(chunk, self.tts.output_rate)
        except TtsError as exc:
            raise _RequestError(f"tts_{exc.reason}", str(exc)) from None
        except Exception as exc:  # an offline voice that failed: this request fails, the listener stays
            log.exception("Wyoming synthesis failed")
            raise _RequestError("tts_error", f"TTS failed: {type(exc).__name__}") from None
        if self.resampler is not None:
            await self._chunks(self.resampler.flush().tobytes())
            self.resampler = None

    async def close(self) -> None:
        if self.rate is None:
            await self.send(AudioStart(rate=self.tts.output_rate, width=2, channels=1).event())
        await self.send(AudioStop().event())

    async def _emit(self, pcm: bytes, rate: int) -> None:
        if self.rate is None:
            self.rate = rate
            await self.send(AudioStart(rate=rate, width=2, channels=1).event())
        if rate != self.rate:  # a remote service that changed its rate between sentences
            if self.resampler is None or self.resampler.src_rate != rate:
                self.resampler = StreamResampler(rate, self.rate)
            pcm = self.resampler.process(pcm).tobytes()
        await self._chunks(pcm)

    async def _chunks(self, pcm: bytes) -> None:
        step = AUDIO_CHUNK_SAMPLES * 2
        for offset in range(0, len(pcm), step):
            await self.send(AudioChunk(rate=self.rate or self.tts.output_rate, width=2, channels=1,
                                       audio=pcm[offset:offset + step]).event())


class _StreamedSynthesis:
    """``synthesize-start`` … ``synthesize-stop``: each sentence is spoken as soon as its text is
    complete, all into one audio stream. A refused request (too long, a TTS failure) is answered once
    with ``error``; its later chunks are dropped and ``synthesize-stop`` still ends it cleanly."""

    def __init__(self, lang: str | None, audio: _AudioOut) -> None:
        self.lang, self.audio = lang, audio
        self.splitter = SentenceSplitter(min_chars=2)
        self.chars = 0
        self.failed = False

    async def feed(self, text: str) -> None:
        if self.failed:
            return
        self.chars += len(text)
        if self.chars > MAX_TEXT_CHARS:
            self.failed = True
            raise _RequestError("text_too_long", f"more than {MAX_TEXT_CHARS} characters to speak")
        await self._speak(self.splitter.feed(text))

    async def finish(self) -> None:
        try:
            if not self.failed:
                await self._speak(self.splitter.flush())
        finally:
            await self.audio.close()

    async def _speak(self, sentences: list[str]) -> None:
        try:
            for sentence in sentences:
                await self.audio.speak(sentence, self.lang)
        except _RequestError:
            self.failed = True
            raise
