"""The protocol-agnostic heart of a speaker session: microphone audio in, turns out.

A protocol driver (native or open-xiaoai) owns the socket; it hands this object the device's PCM and
its control intents (abort, wake, end of speech) and gives it a :class:`~voicegrow.streaming.turn.
DeviceLink` to answer through. Here live the VAD, speculative transcription, barge-in and the one
running turn; all of them are tasks of the session's nursery, so the session's end ends them all.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import trio

from voicegrow.pipeline.llm import ConversationHistory
from voicegrow.services import Services
from voicegrow.sessions.registry import SessionInfo
from voicegrow.listening import ListenGate, ListenMode
from voicegrow.storage.errors import BackendUnavailable
from voicegrow.streaming.bargein import EchoGuard, resolve_mode
from voicegrow.streaming.events import ReplyStopped
from voicegrow.streaming.turn import Announcement, DeviceLink, HeldLink, Turn, Utterance
from voicegrow.pipeline.vad_classifiers import make_classifier
from voicegrow.pipeline.vad import (
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    UtteranceDropped,
    UtteranceEnded,
    VadSegmenter,
)

__all__ = ["VoiceSession", "begin_device_session"]

log = logging.getLogger(__name__)

VAD_RATE = 16000
#: How much further under the user's voice than VAD_RELATIVE_DB an utterance must be to start no turn
#: (the user's own level varies by a few dB from one question to the next).
_BACKGROUND_EXTRA_DB = 5.0


class _Speculation:
    """A transcription started at the first silence after speech, before the hangover has ended.

    If the utterance ends without more speech, its audio is the paused audio plus silence, so this
    result is the turn's transcript and the hangover no longer adds to the ASR time.
    """

    def __init__(self, audio: bytes) -> None:
        self.audio_len = len(audio)
        self.audio = audio
        self.scope = trio.CancelScope()
        self.done = trio.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    async def run(self, services: Services, language: str | None) -> None:
        with self.scope:
            try:
                self.result = await services.asr.transcribe(self.audio, language=language)
            except trio.Cancelled:
                raise
            except Exception as exc:
                # Kept without its traceback: that holds this frame, and so this object, which holds
                # the error: a cycle that keeps the turn (audio and all) until a full collection.
                self.error = exc.with_traceback(None)
        self.done.set()

    async def wait(self) -> Any:
        await self.done.wait()
        if self.error is not None:
            error, self.error = self.error, None  # one turn waits for it; raising adds this frame
            try:
                raise error
            finally:
                del error  # a local naming the error in a frame of its own traceback is a cycle too
        if self.result is None:
            raise trio.TooSlowError("speculative transcription was cancelled")
        return self.result


class _Preemption:
    """A turn started on a speculation's transcript before the hangover ended (``LLM_PREEMPTIVE``).

    It runs ASR → LLM → first sentence → TTS while the VAD still waits for the silence to last, holding
    everything it would send (:class:`HeldLink`). The end of the utterance with no more speech releases
    it: the reply is ready when the hangover ends. More speech cancels it, before anything was said.
    """

    def __init__(self, turn: Turn, scope: trio.CancelScope, link: HeldLink) -> None:
        self.turn = turn
        self.scope = scope
        self.link = link


class _TypedTranscript:
    """A typed utterance (text the device sent instead of speech) in the shape of an ASR result."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.language = ""
        self.dropped = 0


class _EchoCheckedTranscript:
    """A transcript that repeats the reply it was heard over: the turn drops it (no LLM request)."""

    echo_of_reply = True

    def __init__(self, transcript: Any) -> None:
        self.text = transcript.text
        self.language = transcript.language
        self.dropped = getattr(transcript, "dropped", 0)


class VoiceSession:
    def __init__(self, services: Services, link: DeviceLink, info: SessionInfo, *,
                 history: ConversationHistory | None = None, listen_mode: ListenMode = ListenMode.ALWAYS,
                 listen_override: ListenMode | None = None,
                 device_cancels_echo: bool = False, barge_in: str | None = None) -> None:
        """``listen_mode``: the mode the settings and the hello give the device; ``listen_override``:
        the one an operator set for it through the admin API, which wins (see :meth:`set_listen_mode`)."""
        s = services.settings
        self.services = services
        self.link = link
        self.info = info
        self.history = history or ConversationHistory(max_turns=s.llm_history_turns, max_chars=s.llm_history_chars)
        classifier = make_classifier(s.vad_engine, sample_rate=VAD_RATE, frame_ms=s.vad_frame_ms,
                                     aggressiveness=s.vad_aggressiveness)
        self.vad = VadSegmenter(sample_rate=VAD_RATE, frame_ms=s.vad_frame_ms, aggressiveness=s.vad_aggressiveness,
                                preroll_ms=s.vad_preroll_ms, silence_ms=s.vad_silence_ms,
                                min_speech_ms=s.vad_min_speech_ms, max_utterance_s=s.vad_max_utterance_s,
                                classifier=classifier, relative_db=s.vad_relative_db)
        self._user_level_dbfs: float | None = None  # how loud the user's turns were (VAD_RELATIVE_DB)
        self._base_listen_mode = listen_mode
        mode = listen_override or listen_mode
        info.listen_mode = mode.value
        self.gate = ListenGate(mode, follow_up_s=s.follow_up_s, wake_preroll_s=s.wake_preroll_ms / 1000)
        self._stream_pos_s = 0.0  # seconds of audio fed to the VAD
        self._nursery: trio.Nursery | None = None
        self._turn: Turn | None = None
        self._turn_scope: trio.CancelScope | None = None
        self._turn_ids = 0
        self._speculation: _Speculation | None = None
        self._preemption: _Preemption | None = None
        #: a pause long enough to preempt on yet? (speculation, its utterance, the pause's VAD position)
        self._preempt_pending: tuple[_Speculation, Utterance, float] | None = None
        self._flushing = False  # the device ended the utterance (push-to-talk), not the VAD
        self.language = None if s.asr_language == "auto" else s.asr_language
        self.echo = _echo_guard(services, barge_in or s.barge_in, device_cancels_echo)
        info.barge_in = self.echo.mode.name
        self._onset_s = 0.0  # the open utterance's onset (VAD stream position)
        self._onset_over_reply = False  # the reply could be heard when it began
        self._barged = False  # it interrupted the reply

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the session's nursery for turns and speculative ASR until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            # The registry's SessionInfo gets our methods only while we run: the info is ours too, and
            # keeping them afterwards would tie this session (its last turn's audio and all) in a cycle
            # that only a full garbage collection, hours apart in this process, would free.
            self.info.announce, self.info.state_of = self.announce, self.state
            self.info.set_listen_mode = self.set_listen_mode
            try:
                if self.services.timers is not None:  # reminders held while the device was away
                    self.services.timers.device_online(self.info.device_id)
                await trio.sleep_forever()
            finally:
                self.info.announce = self.info.state_of = self.info.set_listen_mode = None

    def set_listen_mode(self, override: ListenMode | None) -> ListenMode:
        """An operator changed the device's mode while it is connected (None: back to the mode the
        settings and the hello gave it). A new gate: a wake window or follow-up of the old mode does not
        carry over, and an utterance already open is judged by the new mode when it ends."""
        mode = override or self._base_listen_mode
        if mode is not self.gate.mode:
            s = self.services.settings
            self.gate = ListenGate(mode, follow_up_s=s.follow_up_s, wake_preroll_s=s.wake_preroll_ms / 1000)
            if mode is not ListenMode.PUSH_TO_TALK:
                self.vad.hold_until_flush = False  # a held push-to-talk utterance ends on silence again
            log.info("listening mode of %s is now %s", self.info.device_id, mode.value)
        self.info.listen_mode = mode.value
        return mode

    def state(self) -> str:
        """For the console's live list: a reply playing, a turn before its audio, speech heard, idle, or
        idle until a wake signal (``wake`` and ``push_to_talk`` modes)."""
        turn = self._turn
        if turn is not None and not turn.done.is_set() and not turn.interrupted:
            return "speaking" if turn.playing else "thinking"
        if not self.gate.listening(self._stream_pos_s) and not self.vad.in_speech:
            return "waiting_for_wake"
        return "hearing" if self.vad.current_speech_ms > 0 else "listening"

    # -- input from the driver --------------------------------------------------------------------

    async def feed_audio(self, pcm: bytes) -> None:
        """Microphone PCM s16le mono at ``VAD_RATE`` (the driver's :class:`AudioIngress` resampled it);
        runs the VAD and acts on what it sees."""
        now = trio.current_time()
        self._stream_pos_s += len(pcm) / 2 / VAD_RATE
        pcm = self.echo.front_end(pcm, now, self._stream_pos_s)
        for event in self.vad.feed(pcm):
            await self._on_vad_event(event, now)
        pending = self._preempt_pending
        if pending is not None and self.vad.position_s - pending[2] >= self.services.settings.llm_preemptive_after_ms / 1000:
            self._preempt_pending = None
            if not (self._onset_over_reply and not self._barged):  # no LLM call for the reply's echo
                self._preempt(pending[0], pending[1])
        self._check_barge_in()

    async def end_of_speech(self) -> None:
        """The device says the user stopped talking (push-to-talk release): end the utterance now."""
        now = trio.current_time()
        self._flushing = True
        try:
            for event in self.vad.flush():
                await self._on_vad_event(event, now)
        finally:
            self._flushing = False
            if self.gate.mode is ListenMode.PUSH_TO_TALK:
                self.gate.release(self._stream_pos_s)
                self.vad.hold_until_flush = False

    async def text_input(self, text: str) -> None:
        """A typed utterance: a turn as if ``text`` had been heard."""
        now = trio.current_time()
        transcript = _TypedTranscript(text)

        async def source() -> Any:
            return transcript

        await self._start_turn(Utterance(audio=b"", speech_start=now, speech_end=now), source)

    async def announce(self, text: str, language: str, data: dict[str, Any]) -> None:
        """Say ``text`` on the device as a turn of its own (a reminder); it supersedes a running turn."""
        now = trio.current_time()

        async def no_transcript() -> Any:
            raise RuntimeError("an announcement has no transcript")

        await self._start_turn(Utterance(audio=b"", speech_start=now, speech_end=now), no_transcript,
                               Announcement(text, language, data))
    def set_push_to_talk(self, enabled: bool) -> None:
        """Push-to-talk (a device that says when the user stops): pauses never end the utterance,
        :meth:`end_of_speech` does."""
        self.vad.hold_until_flush = enabled

    async def abort(self, reason: str = "abort") -> None:
        """The device asked to stop the reply."""
        await self._interrupt(reason)

    def open_listening(self) -> None:
        """The device opened its microphone for the user (xiaozhi's ``listen start`` after its own wake
        word): a wake signal that interrupts nothing."""
        self.gate.wake(self._stream_pos_s)

    @property
    def position_s(self) -> float:
        """Seconds of microphone audio received so far: where a signal arriving now sits in the stream."""
        return self._stream_pos_s

    async def wake(self, at_s: float | None = None) -> None:
        """A wake word or a button press: stop talking and listen (in ``wake`` and ``push_to_talk``
        modes, the signal lets the speech around it become a turn). ``at_s``: where in the stream the
        signal arrived, when the caller runs this later (default: now)."""
        self.gate.wake(self._stream_pos_s if at_s is None else at_s)
        if self.gate.mode is ListenMode.PUSH_TO_TALK:
            self.vad.hold_until_flush = True  # held until listen_stop
        if self.echo.mode.wake_interrupts:  # unless BARGE_IN=off
            await self._interrupt("wake")

    # -- VAD events ---------------------------------------------------------------------------------

    def _wall(self, stream_pos_s: float, now: float) -> float:
        """Map a VAD stream position to the trio clock, assuming the chunk just fed arrived ``now``."""
        return now - (self._stream_pos_s - stream_pos_s)

    async def _on_vad_event(self, event: object, now: float) -> None:
        if isinstance(event, SpeechStarted):
            self._onset_s = event.at_s
            self._onset_over_reply = self._reply_running() and self.echo.reply_audible()
            self._barged = False
        elif isinstance(event, SpeechPaused):
            self._cancel_speculation()
            if (self.services.settings.asr_speculative and self._nursery is not None
                    and self.gate.may_be_heard(self._onset_s)):
                spec = self._speculation = _Speculation(event.audio)
                self._nursery.start_soon(spec.run, self.services, self.language)
                if self.services.settings.llm_preemptive and not self.vad.hold_until_flush:
                    utterance = Utterance(audio=event.audio, speech_start=self._wall(self._onset_s, now),
                                          speech_end=self._wall(event.at_s, now))
                    self._preempt_pending = (spec, utterance, event.at_s)
        elif isinstance(event, SpeechResumed):
            self._cancel_speculation()
        elif isinstance(event, UtteranceDropped):
            self._cancel_speculation()
        elif isinstance(event, UtteranceEnded):
            if event.forced and not self._flushing:  # VAD_MAX_UTTERANCE_S cut it
                self.services.metrics.limit_hits.labels("utterance_length").inc()
            if self._onset_over_reply and not self._barged and not self._flushing:
                # Heard over the reply without passing the barge-in test: the speaker's own voice
                # (its echo, or a canceller not yet converged: a garbled echo transcript would start a
                # turn), or speech that may not interrupt (wake_word, off). Nothing to answer.
                self._cancel_speculation()
                preemption, self._preemption, self._preempt_pending = self._preemption, None, None
                if preemption is not None:
                    self._cancel_preemption(preemption)
                proven = self.echo.canceller_proven(self._onset_s)
                self.services.metrics.echo_rejected.labels("level" if proven else "unproven").inc()
                log.info("dropping an utterance heard over the reply (%.1f-%.1f s, barge-in %s)",
                         event.start_s, event.end_s, self.echo.mode.name)
                return
            if self._is_background(event.level_dbfs):
                self._cancel_speculation()
                self.services.metrics.utterances_ignored.labels("background").inc()
                log.debug("ignoring an utterance at %.0f dBFS: far under the user's voice", event.level_dbfs)
                return
            keep_from = self.gate.admit(event.start_s, event.end_s)
            if keep_from is None:  # not addressed to us (LISTEN_MODE)
                self._cancel_speculation()
                self.services.metrics.utterances_ignored.labels(self.gate.mode.value).inc()
                log.debug("ignoring an utterance (%.1f-%.1f s): no wake signal", event.start_s, event.end_s)
                return
            event = _trimmed(event, keep_from)
            self._note_user_level(event.level_dbfs)
            spec, self._speculation = self._speculation, None
            preemption, self._preemption = self._preemption, None
            self._preempt_pending = None
            usable = (spec is not None and not event.forced and event.paused_audio_len is not None
                      and spec.audio_len == event.paused_audio_len)
            utterance = Utterance(audio=event.audio, speech_start=self._wall(event.start_s, now),
                                  speech_end=self._wall(event.end_s, now), forced=event.forced)
            if preemption is not None:
                if usable and await self._confirm(preemption, utterance):
                    return
                self._cancel_preemption(preemption)
            if usable:
                assert spec is not None
                source = spec.wait
            else:
                if spec is not None:
                    spec.scope.cancel()
                audio = event.audio

                async def source() -> Any:
                    return await self.services.asr.transcribe(audio, language=self.language)
            if self._onset_over_reply:  # it interrupted the reply: it may still be its echo
                source = self._echo_checked(source)
            await self._start_turn(utterance, source)

    def _is_background(self, level_dbfs: float) -> bool:
        """Speech ``VAD_RELATIVE_DB`` + 5 dB under the user's turns so far: a television across the
        room, not the person who talks to the speaker (undecidable before the user was first heard)."""
        relative = self.services.settings.vad_relative_db
        user = self._user_level_dbfs
        noisy = getattr(self.vad.classifier, "noisy", True)  # in a quiet room there is no background
        return (relative > 0 and noisy and user is not None
                and level_dbfs < user - relative - _BACKGROUND_EXTRA_DB)

    def _note_user_level(self, level_dbfs: float) -> None:
        """Learn the user's level from turns that sound like the user (not from a quiet one let
        through in a quiet room: the bar would sink with each)."""
        relative = self.services.settings.vad_relative_db
        if relative > 0 and level_dbfs > -100.0:
            user = self._user_level_dbfs
            if user is None:
                self._user_level_dbfs = level_dbfs
            elif level_dbfs >= user - relative:
                self._user_level_dbfs = 0.5 * (user + level_dbfs)

    def _cancel_speculation(self) -> None:
        self._preempt_pending = None
        if self._speculation is not None:
            self._speculation.scope.cancel()
            self._speculation = None
        if self._preemption is not None:
            self._cancel_preemption(self._preemption)
            self._preemption = None

    # -- preemptive replies (LLM_PREEMPTIVE) --------------------------------------------------------

    def _preempt(self, spec: _Speculation, utterance: Utterance) -> None:
        """Start the reply to the speculation's transcript now; it waits for :meth:`_confirm`."""
        previous = self._turn
        if previous is not None and not previous.done.is_set() and not previous.interrupted:
            return  # a reply is still running: the end of this utterance will supersede it, as ever
        link = HeldLink(self.link)
        turn = self._new_turn(utterance, spec.wait, None, turn_id=self._turn_ids + 1, link=link,
                              confirmed=link.released)
        scope = trio.CancelScope()
        self._preemption = _Preemption(turn, scope, link)
        self._launch(turn, scope, previous)

    async def _confirm(self, preemption: _Preemption, utterance: Utterance) -> bool:
        """The utterance ended as the preemptive turn assumed: it becomes the turn, and plays."""
        turn = preemption.turn
        if turn.done.is_set() or turn.turn_id != self._turn_ids + 1:
            return False  # it crashed, or another turn (a typed one, a reminder) started meanwhile
        previous = self._turn
        if previous is not None and not previous.done.is_set():
            await self._interrupt("new_utterance")
        self._turn_ids += 1
        self.info.turns += 1
        turn.utterance = utterance  # the whole utterance (trailing silence too) is what gets stored
        turn.marks["speech_start"], turn.marks["speech_end"] = utterance.speech_start, utterance.speech_end
        self._turn, self._turn_scope = turn, preemption.scope
        self.services.metrics.llm_preemptive.labels("used").inc()
        await preemption.link.release()
        return True

    @staticmethod
    def _cancel_preemption(preemption: _Preemption) -> None:
        """The user went on talking: the held reply is dropped (its turn counts a wasted LLM call)."""
        preemption.scope.cancel()

    # -- turns and barge-in ---------------------------------------------------------------------

    def _reply_running(self) -> bool:
        turn = self._turn
        return turn is not None and not turn.done.is_set() and not turn.interrupted

    def _echo_checked(self, transcribe: Any) -> Any:
        """Wrap a transcript source: a transcript that repeats the reply it interrupted is echo."""
        turn = self._turn
        reply = turn.reply_text if turn is not None else ""
        guard = self.echo
        metrics = self.services.metrics

        async def source() -> Any:
            transcript = await transcribe()
            lang = transcript.language if transcript.language in ("zh", "en") else "en"
            if guard.is_echo_transcript(transcript.text, reply, lang):
                metrics.echo_rejected.labels("transcript").inc()
                log.info("the utterance %r repeats the reply: echo", transcript.text[:80])
                return _EchoCheckedTranscript(transcript)
            return transcript

        return source

    def _check_barge_in(self) -> None:
        turn = self._turn
        if turn is None or turn.done.is_set() or turn.interrupted:
            return
        if not self.gate.allows_barge_in:
            return  # wake and push-to-talk: only a wake signal interrupts (the TV would, else)
        if turn.utterance.forced:
            return  # the speech going on is the rest of the same long utterance, not an interruption
        if (self.vad.current_speech_ms >= self.services.settings.barge_in_min_ms
                and self.echo.speech_counts(self._onset_s)):
            self._barged = True
            log.info("barge-in: user speech while turn %s was %s (echo canceller kept %s dB)", turn.turn_id,
                     "playing" if turn.playing else "thinking", self.echo.kept_db_since(self._onset_s))
            assert self._nursery is not None
            self._nursery.start_soon(self._interrupt, "barge_in")

    async def _interrupt(self, reason: str) -> None:
        turn, scope = self._turn, self._turn_scope
        if turn is None or scope is None or turn.done.is_set() or turn.interrupted:
            return
        turn.interrupted = True
        was_playing = turn.playing
        scope.cancel()
        await self.link.interrupt(turn.turn_id)
        if self.echo.tap is not None:  # the device plays none of what it still had: no echo of it
            self.echo.tap.stopped(trio.current_time())
        if was_playing:
            await self.link.send_event(ReplyStopped(turn.turn_id, interrupted_by=reason))

    async def _start_turn(self, utterance: Utterance, transcribe: Any, announcement: Announcement | None = None) -> None:
        """Start the utterance's turn; a turn still running is superseded (one turn at a time).

        Called from the reader, so it never waits for the old turn to wind down: the new turn's task
        does, so that the old turn's history and record come first.
        """
        assert self._nursery is not None
        previous = self._turn
        if previous is not None and not previous.done.is_set():
            await self._interrupt("new_utterance")
        self._turn_ids += 1
        self.info.turns += 1
        turn = self._new_turn(utterance, transcribe, announcement, turn_id=self._turn_ids, link=self.link)
        scope = trio.CancelScope()
        self._turn, self._turn_scope = turn, scope
        self._launch(turn, scope, previous)

    def _new_turn(self, utterance: Utterance, transcribe: Any, announcement: Announcement | None, *,
                  turn_id: int, link: DeviceLink, confirmed: trio.Event | None = None) -> Turn:
        return Turn(services=self.services, link=link, turn_id=turn_id, utterance=utterance,
                    history=self.history, session_id=self.info.session_id,
                    device_id=self.info.device_id or self.info.session_id, transcribe=transcribe,
                    announcement=announcement, confirmed=confirmed, playout=self.echo.tap)

    def _launch(self, turn: Turn, scope: trio.CancelScope, previous: Turn | None) -> None:
        """Run ``turn`` in the session's nursery under ``scope``, after ``previous`` has wound down."""
        assert self._nursery is not None

        async def run_turn() -> None:
            try:
                with scope:
                    if previous is not None:
                        await previous.done.wait()
                    await turn.run()
            except Exception:  # a bug in one turn must not end the session
                log.exception("turn %s crashed", turn.turn_id)
            finally:
                turn.done.set()  # also when it was superseded before it began
                if self._turn is turn:  # the reply is over: the follow-up window opens
                    self.gate.reply_ended(self._stream_pos_s)

        self._nursery.start_soon(run_turn)


def _trimmed(event: UtteranceEnded, keep_from: float) -> UtteranceEnded:
    """The utterance without its audio before ``keep_from`` (speech long before a wake signal)."""
    cut_s = keep_from - event.audio_start_s
    if cut_s <= 0:
        return event
    cut = min(len(event.audio), int(cut_s * VAD_RATE) * 2)
    paused = event.paused_audio_len - cut if event.paused_audio_len is not None else None
    return dataclasses.replace(event, audio=event.audio[cut:], audio_start_s=keep_from,
                               start_s=max(event.start_s, keep_from),
                               paused_audio_len=paused if paused is not None and paused > 0 else None)


def _echo_guard(services: Services, policy: str, device_cancels_echo: bool) -> EchoGuard:
    """The session's barge-in policy and, where it asks for one, its echo canceller."""
    from voicegrow.echo import EchoCanceller, EchoUnavailable

    settings = services.settings
    mode = resolve_mode(policy, device_cancels_echo=device_cancels_echo)
    canceller = None
    if mode.cancel_echo:
        try:
            canceller = EchoCanceller()
        except EchoUnavailable as exc:
            log.warning("no echo cancellation for this session (%s): barge-in relies on transcripts", exc)
    return EchoGuard(mode, kept_db=settings.barge_in_echo_kept_db, canceller=canceller)


#: How long a session's start waits for the record store's answer about the device's listening mode.
_LISTEN_OVERRIDE_WAIT_S = 1.0


async def listen_mode_override(services: Services, device_id: str) -> ListenMode | None:
    """The listening mode an operator set for the device through the admin API (stored with the device's
    record), or None. A record store that cannot answer in time leaves the settings to decide: the
    device is served, in the mode it would have without the override, and the log says so."""
    if not device_id:
        return None
    stored: str | None = None
    try:
        with trio.move_on_after(_LISTEN_OVERRIDE_WAIT_S) as waited:
            stored = await services.persistence.listen_mode(device_id)
        if waited.cancelled_caught:
            log.warning("listening mode of %s: the record store did not answer within %g s; using the settings",
                        device_id, _LISTEN_OVERRIDE_WAIT_S)
    except BackendUnavailable as exc:
        log.warning("listening mode of %s: the record store cannot answer (%s); using the settings", device_id, exc)
    if not stored:
        return None
    try:
        return ListenMode(stored)
    except ValueError:
        log.warning("listening mode of %s: ignored a stored mode %r", device_id, stored)
        return None


async def begin_device_session(services: Services, info: SessionInfo) -> ConversationHistory:
    """Record the session once the device is known, and restore its conversation so far.

    The device may have reconnected, to this replica or another one: the history comes from the
    shared session state, so the conversation simply goes on.
    """
    from voicegrow.storage.records import SessionRecord

    s = services.settings
    history = ConversationHistory(max_turns=s.llm_history_turns, max_chars=s.llm_history_chars)
    persistence = services.persistence
    try:
        await persistence.session_started(SessionRecord(
            session_id=info.session_id, device_id=info.device_id, protocol=info.protocol,
            remote_addr=info.remote_addr, started_at=info.since))
        await persistence.device_seen(info.device_id, {"protocol": info.protocol, "remote_addr": info.remote_addr})
        await persistence.claim_device(info.device_id, info.session_id)
        with trio.move_on_after(2.0):
            history.load_messages(await persistence.load_history(info.device_id))
    except Exception:
        log.exception("could not restore the conversation of %s", info.device_id)
    return history
