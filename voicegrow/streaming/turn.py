"""One turn: an utterance in, a spoken reply out, as one task tree.

ASR → LLM token stream → sentence splitter → TTS per sentence → paced audio, each stage a task joined
by bounded channels, so the first sentence is synthesized and playing while the LLM is still writing
the rest. The whole tree lives in one cancel scope: a barge-in or a disconnect cancels it and nothing
of this turn is sent afterwards. Whatever happens, the turn ends with a record of what was heard,
what was actually played, and when each stage finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import numpy as np
import trio

from voicegrow.audio import StreamResampler
from voicegrow.language import detect_language
from voicegrow.pipeline.llm import DEFAULT_SYSTEM_PROMPT, ConversationHistory, LlmError, apology
from voicegrow.pipeline.sentences import SentenceSplitter
from voicegrow.services import Services
from voicegrow.streaming.events import (
    TIMING_ORDER,
    AnnouncementStarted,
    ReplySentence,
    ReplyStarted,
    ReplyStopped,
    ReplyText,
    SpokenError,
    TranscriptFinal,
    TurnEnded,
    TurnEvent,
    TurnTimings,
)
from voicegrow.streaming.pacer import AudioPacer
from voicegrow.tools import ToolContext, ToolOutcome
from voicegrow.tools.runner import converse

__all__ = ["Announcement", "DeviceLink", "HeldLink", "Utterance", "Turn", "TIMING_ORDER"]

log = logging.getLogger(__name__)

class DeviceLink(Protocol):
    """What a turn needs from the connection, whatever the wire protocol: each driver's link puts
    the typed :mod:`~voicegrow.streaming.events` on its own wire, and reply audio too."""

    protocol: str
    output_rate: int
    chunk_ms: int

    async def send_event(self, event: TurnEvent) -> None: ...

    async def send_audio(self, pcm: bytes, turn_id: int) -> None: ...

    async def interrupt(self, turn_id: int) -> None: ...


@dataclasses.dataclass
class Utterance:
    audio: bytes  # 16 kHz mono s16le, pre-roll included
    speech_start: float  # trio clock
    speech_end: float  # trio clock
    forced: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _SentenceAudio:
    """A piece of a sentence's synthesized audio, at the link's rate (TTS stage → playback stage)."""

    index: int  # the sentence's place in the reply
    sentence: str
    pcm: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class _SentenceDone:
    """A sentence's audio is complete (or its synthesis failed): what was sent of it is played out."""

    index: int
    sentence: str


_ReplyAudio = _SentenceAudio | _SentenceDone


@dataclasses.dataclass(frozen=True)
class Announcement:
    """Something the server says on its own (a timer going off): no ASR, no LLM, just the words."""

    text: str
    language: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


TranscriptSource = Callable[[], Awaitable[Any]]


class HeldLink:
    """The link of a preemptive turn, one started before the end of the utterance was confirmed.

    Its events wait here, in order, and its audio waits too, until :meth:`release` (the VAD confirmed
    the end of the turn); a turn cancelled before that (the user went on talking) has told the device
    nothing at all. After the release everything passes straight through.
    """

    def __init__(self, link: DeviceLink) -> None:
        self._link = link
        self.inner = link  # what tools act on (a call waits for the release anyway)
        self.protocol = link.protocol
        self.output_rate = link.output_rate
        self.chunk_ms = link.chunk_ms
        self._held: list[TurnEvent] = []
        self.released = trio.Event()

    async def release(self) -> None:
        """Send what was held, in order (events held meanwhile too), then let everything through."""
        while self._held:
            await self._link.send_event(self._held.pop(0))
        self.released.set()

    async def send_event(self, event: TurnEvent) -> None:
        if not self.released.is_set():
            self._held.append(event)
            return
        await self._link.send_event(event)

    async def send_audio(self, pcm: bytes, turn_id: int) -> None:
        if not self.released.is_set():  # (no checkpoint once released: the first frame's stamp is its send)
            await self.released.wait()
        await self._link.send_audio(pcm, turn_id)

    async def interrupt(self, turn_id: int) -> None:
        if self.released.is_set():
            await self._link.interrupt(turn_id)


class _GatedTools:
    """A preemptive turn's tools: a call waits for the end of the turn, since it acts on the world
    (a timer set, the volume changed) and the user may not have finished asking."""

    def __init__(self, registry: Any, confirmed: trio.Event) -> None:
        self._registry = registry
        self._confirmed = confirmed

    def openai_tools(self) -> Any:
        return self._registry.openai_tools()

    async def call(self, call: Any, context: Any) -> Any:
        await self._confirmed.wait()
        return await self._registry.call(call, context)


class Turn:
    """Runs one utterance to its reply. Create, then ``await run()`` inside the turn's cancel scope."""

    def __init__(self, *, services: Services, link: DeviceLink, turn_id: int, utterance: Utterance,
                 history: ConversationHistory, session_id: str, device_id: str,
                 transcribe: TranscriptSource, announcement: Announcement | None = None,
                 confirmed: trio.Event | None = None,
                 playout: Any = None) -> None:
        self.services = services
        self.link = link
        self.turn_id = turn_id
        self.utterance = utterance
        self.history = history
        self.session_id = session_id
        self.device_id = device_id
        self._transcribe = transcribe
        self.announcement = announcement
        #: Told of every chunk sent with when it plays (``played(pcm, rate, at)``): the echo reference.
        self.playout = playout
        #: Set once the utterance has surely ended. A preemptive turn (LLM_PREEMPTIVE) starts before
        #: that: it plays nothing, calls no tool and keeps no record until it is set.
        self.confirmed = confirmed if confirmed is not None else trio.Event()
        if confirmed is None:
            self.confirmed.set()
        self.llm_asked = False  # for a preemptive turn cancelled unconfirmed: was an LLM call wasted?
        self.tool_outcomes: list[ToolOutcome] = []
        self.silenced = False  # the model called "stop": nothing is said, nothing kept in the history
        self.record_id = uuid.uuid4().hex
        self.started_wall = time.time()
        self.marks: dict[str, float] = {"speech_start": utterance.speech_start,
                                         "speech_end": utterance.speech_end}
        self.transcript = ""
        self.language = ""
        self.reply_text = ""
        self.played_sentences: list[str] = []
        self.reply_audio = bytearray()
        self.outcome = "interrupted"  # until proven otherwise
        self.error: str | None = None
        self.playing = False  # between ReplyStarted and ReplyStopped
        self.interrupted = False
        self.done = trio.Event()

    # -- the stages -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run_stages()
            await self.confirmed.wait()  # a preemptive turn with nothing to say still waits to be kept
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()
            self.done.set()

    async def _run_stages(self) -> None:
        settings = self.services.settings
        if self.announcement is not None:
            await self._announce(self.announcement)
            return
        try:
            transcript = await self._transcribe()
        except trio.Cancelled:
            raise
        except Exception as exc:
            self.outcome, self.error = "failed", f"asr: {type(exc).__name__}: {exc}"
            log.warning("ASR failed for turn %s: %s", self.turn_id, self.error)
            await self._apologise_for_asr(getattr(exc, "code", "asr_error"))
            return
        self._mark("asr_done")
        if getattr(transcript, "echo_of_reply", False):  # the speaker heard its own reply (bargein.py)
            self.outcome = "echo"
            return
        self.transcript = transcript.text.strip()
        language = transcript.language
        self.language = language if language in ("zh", "en") else detect_language(self.transcript)
        await self.link.send_event(TranscriptFinal(self.turn_id, self.transcript, self.language,
                                                   transcript.dropped))
        if not self.transcript:
            self.outcome = "empty"
            return
        user_text = self.transcript[: settings.max_llm_input_chars]
        if len(user_text) < len(self.transcript):
            self.services.metrics.limit_hits.labels("llm_input_chars").inc()
        messages = self.history.messages(settings.llm_system_prompt or DEFAULT_SYSTEM_PROMPT, user_text)
        await self._speak(functools.partial(self._llm_stage, messages))

    async def _speak(self, produce: Callable[[trio.MemorySendChannel[str]], Awaitable[None]]) -> None:
        """Sentences from ``produce`` → TTS → paced audio, the three stages side by side."""
        sentences_tx, sentences_rx = trio.open_memory_channel[str](16)
        audio_tx, audio_rx = trio.open_memory_channel[_ReplyAudio](256)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, sentences_tx)
            nursery.start_soon(self._tts_stage, sentences_rx, audio_tx)
            nursery.start_soon(self._playback_stage, audio_rx)
        if self.error is None:
            self.outcome = "completed"

    async def _announce(self, announcement: Announcement) -> None:
        self.language = announcement.language
        self.reply_text = announcement.text
        await self.link.send_event(AnnouncementStarted(self.turn_id, announcement.text, announcement.data))

        async def say(sentences: trio.MemorySendChannel[str]) -> None:
            splitter = self._splitter()
            async with sentences:
                for sentence in [*splitter.feed(announcement.text), *splitter.flush()]:
                    await self._emit_sentence(sentence, sentences)

        await self._speak(say)

    async def _apologise_for_asr(self, reason: str) -> None:
        """The recogniser failed (a remote ASR down, a timeout): the speaker hears so instead of silence.
        Nothing was understood, so the language is ``ASR_LANGUAGE``'s, Chinese under ``auto``."""
        configured = self.services.settings.asr_language
        self.language = configured if configured in ("zh", "en") else "zh"
        spoken = apology(self.language)
        await self.link.send_event(SpokenError(self.turn_id, reason, spoken))

        async def say(sentences: trio.MemorySendChannel[str]) -> None:
            async with sentences:
                await self._emit_sentence(spoken, sentences)

        await self._speak(say)

    async def _llm_stage(self, messages: list[dict[str, str]], sentences: trio.MemorySendChannel[str]) -> None:
        splitter = self._splitter()
        services = self.services
        metrics = services.metrics
        device = self.link.inner if isinstance(self.link, HeldLink) else self.link
        context = ToolContext(self.device_id, self.language, ZoneInfo(services.settings.tz), device=device)
        async with sentences:
            try:
                self.llm_asked = True
                answer = converse(services.llm, messages, self._tools(), context,
                                  max_rounds=services.settings.llm_tool_rounds, outcomes=self.tool_outcomes)
                # aclosing: a cancelled turn closes its HTTP stream now, not when the GC gets to it.
                async with contextlib.aclosing(answer) as deltas:
                    async for delta in deltas:
                        if not delta:
                            continue
                        if "llm_first_token" not in self.marks:
                            self._mark("llm_first_token")
                        self.reply_text += delta
                        await self.link.send_event(ReplyText(self.turn_id, delta))
                        for sentence in splitter.feed(delta):
                            await self._emit_sentence(sentence, sentences)
                for sentence in splitter.flush():
                    await self._emit_sentence(sentence, sentences)
                self.silenced = context.silenced
                metrics.llm_requests.labels("success").inc()
            except LlmError as exc:
                metrics.llm_requests.labels(exc.reason).inc()
                self.outcome, self.error = "failed", f"llm: {exc.reason}: {exc}"
                log.warning("LLM failed for turn %s (%s): %s", self.turn_id, exc.reason, exc)
                for sentence in splitter.flush():  # what was already said stays said
                    await self._emit_sentence(sentence, sentences)
                spoken = apology(self.language)
                await self.link.send_event(SpokenError(self.turn_id, exc.reason, spoken))
                await self._emit_sentence(spoken, sentences)

    def _splitter(self) -> SentenceSplitter:
        # A whole-sentence voice (the offline Mandarin one) asks for its own cutting: see tts.py.
        splitter_options = getattr(self.services.tts, "splitter_options", None)
        return SentenceSplitter(**(splitter_options(self.language) if splitter_options else {}))

    def _tools(self) -> Any:
        """The server's tools, plus the device's own (a xiaozhi board's MCP tools) if it has any."""
        registry = self.services.tools
        info = self.services.registry.get(self.session_id)
        if registry is not None and info is not None and info.device_tools is not None:
            from voicegrow.tools.device import DeviceTools

            registry = registry.with_providers([DeviceTools(info.device_tools)])
        if registry is None or self.confirmed.is_set():
            return registry
        return _GatedTools(registry, self.confirmed)

    async def _emit_sentence(self, sentence: str, sentences: trio.MemorySendChannel[str]) -> None:
        if "first_sentence" not in self.marks:
            self._mark("first_sentence")
        await sentences.send(sentence)

    async def _tts_stage(self, sentences: trio.MemoryReceiveChannel[str],
                         audio: trio.MemorySendChannel[_ReplyAudio]) -> None:
        tts = self.services.tts
        out_rate = self.link.output_rate
        async with audio, sentences:
            index = -1
            async for sentence in sentences:
                index += 1
                resampler = StreamResampler(tts.output_rate, out_rate) if tts.output_rate != out_rate else None
                try:
                    async with contextlib.aclosing(tts.synthesize(sentence, self.language)) as chunks:
                        async for chunk in chunks:
                            if not chunk:
                                continue
                            if "tts_first_audio" not in self.marks:
                                self._mark("tts_first_audio")
                            if resampler is not None:
                                chunk = _pcm_bytes(resampler.process(np.frombuffer(chunk, dtype="<i2")))
                            await audio.send(_SentenceAudio(index, sentence, chunk))
                    if resampler is not None:
                        await audio.send(_SentenceAudio(index, sentence, _pcm_bytes(resampler.flush())))
                    self.services.metrics.tts_requests.labels("success").inc()
                except trio.Cancelled:
                    raise
                except Exception as exc:
                    reason = getattr(exc, "reason", type(exc).__name__)
                    self.services.metrics.tts_requests.labels(
                        "timeout" if reason == "timeout" else "error").inc()
                    self.outcome, self.error = "failed", f"tts: {reason}: {exc}"
                    log.warning("TTS failed for turn %s on %r: %s", self.turn_id, sentence[:40], exc)
                await audio.send(_SentenceDone(index, sentence))

    async def _playback_stage(self, audio: trio.MemoryReceiveChannel[_ReplyAudio]) -> None:
        link = self.link

        async def send(chunk: bytes) -> None:
            if "first_audio_sent" not in self.marks:
                self._mark("first_audio_sent")
            plays_at = pacer.plays_at
            await link.send_audio(chunk, self.turn_id)
            if self.playout is not None:
                # A send that waited long (a player restarting) plays later; a few milliseconds of
                # encoding and queueing do not move the device's continuous playout.
                now = trio.current_time()
                self.playout.played(chunk, link.output_rate, now if now - plays_at > 0.1 else plays_at)
            self.reply_audio += chunk

        pacer = AudioPacer(send, sample_rate=link.output_rate,
                           lead_s=self.services.settings.tts_lead_ms / 1000, chunk_ms=link.chunk_ms)
        try:
            await self._play(audio, link, pacer)
        finally:
            # ``send`` holds ``pacer`` and ``pacer`` holds ``send``: a reference cycle that would keep the
            # whole turn, and with it the session, alive until a full collection.
            pacer = None  # type: ignore[assignment]

    async def _play(self, audio: trio.MemoryReceiveChannel[_ReplyAudio], link: DeviceLink,
                    pacer: AudioPacer) -> None:
        started = False
        announced = -1  # index of the last sentence announced with ReplySentence
        async with audio:
            async for item in audio:
                if not started:
                    await self.confirmed.wait()  # a preemptive turn plays only once the user has finished
                    self.playing = started = True
                    await link.send_event(ReplyStarted(self.turn_id, link.output_rate))
                if item.index != announced:
                    announced = item.index
                    await link.send_event(ReplySentence(self.turn_id, item.sentence))
                if isinstance(item, _SentenceDone):
                    await pacer.flush()
                    self.played_sentences.append(item.sentence)
                    continue
                await pacer.feed(item.pcm)
        await pacer.flush()
        if pacer.last_sent_at is not None:
            self.marks["last_audio_sent"] = pacer.last_sent_at
        await pacer.wait_played()  # "stop" only once the last word has been heard
        if started:
            await link.send_event(ReplyStopped(self.turn_id))
        self.playing = False

    # -- bookkeeping ------------------------------------------------------------------------------

    def _mark(self, name: str) -> None:
        self.marks[name] = trio.current_time()

    def timings_ms(self) -> dict[str, float]:
        """Milliseconds since speech start for every mark reached, in the order they happen."""
        origin = self.marks["speech_start"]
        return {name: round((self.marks[name] - origin) * 1000, 1) for name in TIMING_ORDER if name in self.marks}

    def spoken_reply(self) -> str:
        """What the user actually heard: the whole reply, or after a barge-in the sentences played."""
        return self.reply_text if self.outcome == "completed" else "".join(self.played_sentences)

    async def _finish(self) -> None:
        """Runs shielded: record the turn, keep the history honest, tell the device the timings."""
        services = self.services
        metrics = services.metrics
        if not self.confirmed.is_set():  # a preemptive turn the user talked past: it never happened
            if self.llm_asked:
                metrics.llm_preemptive.labels("wasted").inc()
            return
        metrics.turns.labels(self.outcome).inc()
        for call in self.tool_outcomes:
            source = "device" if call.name.startswith("device__") else "mcp" if "__" in call.name else "builtin"
            metrics.tool_calls.labels(source, "ok" if call.ok else "error").inc()
        end = self.marks["speech_end"]
        stage_marks = {"asr": "asr_done", "llm_first_token": "llm_first_token", "first_sentence": "first_sentence",
                       "tts_first_audio": "tts_first_audio", "response": "first_audio_sent"}
        for stage, mark in stage_marks.items():
            if mark in self.marks:
                metrics.stage_latency.labels(stage).observe(max(0.0, self.marks[mark] - end))
        if self.outcome != "empty":
            metrics.stage_latency.labels("turn").observe(max(0.0, trio.current_time() - end))
        spoken = self.spoken_reply()
        if self.transcript and (spoken or self.outcome == "completed") and not self.silenced:
            self.history.append(self.transcript, spoken)
        timings = self.timings_ms()
        log.info("turn %s %s: heard %r, replied %r", self.turn_id, self.outcome, self.transcript[:80],
                 spoken[:80], extra={"turn": self.turn_id, "timings_ms": timings, "outcome": self.outcome})
        if self.transcript or self.outcome == "failed":
            await self._store(timings, spoken)  # a local spool append: the device hears of it after
        with trio.move_on_after(2.0):
            try:
                await self.link.send_event(TurnEnded(self.turn_id, self.outcome, self.error))
                await self.link.send_event(TurnTimings(self.turn_id, timings))
            except Exception:  # the device may be gone; the record is already kept
                pass
        if self.transcript:
            with trio.move_on_after(2.0):
                try:
                    await services.persistence.save_history(self.device_id, self.history.to_messages())
                except Exception:
                    log.exception("could not save the conversation history of %s", self.device_id)

    async def _store(self, timings: dict[str, float], spoken: str) -> None:
        from voicegrow.storage.records import TurnRecord

        record = TurnRecord(
            turn_id=self.record_id, session_id=self.session_id, device_id=self.device_id,
            started_at=self.started_wall, transcript=self.transcript, reply_text=spoken,
            language=self.language, timings_ms=timings, outcome=self.outcome, error=self.error,
            tool_calls=[outcome.record() for outcome in self.tool_outcomes])
        with trio.move_on_after(5.0):
            try:
                await self.services.persistence.submit_turn(record, self.utterance.audio, 16000,
                                                            bytes(self.reply_audio), self.link.output_rate)
            except Exception:
                log.exception("could not hand turn %s to persistence", self.turn_id)


def _pcm_bytes(samples: np.ndarray) -> bytes:
    return np.asarray(samples, dtype="<i2").tobytes()
