"""Timers and alarms: the tools that set them, and the book that keeps them and fires them.

A timer is a row in the record store (migration 0002) written through the spool, so "timer set"
means it survives a crash or a restart; the book keeps this process's pending timers in memory and
loads the stored ones at start-up (after the spool has replayed what a previous run left). When one
is due, the book asks for the device's live session and has it speak the reminder as a
server-initiated turn. A device that is offline then hears it when it reconnects within
``grace_s``; after that the reminder is dropped and logged.

Several server processes may hold the same stored timers (replicas, workers): before speaking, the
book claims the row with a conditional update, so only one of them fires it. When the record store
cannot answer, the reminder is spoken anyway: a double reminder is better than none.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any, Protocol

import trio

from voicegrow.tools.offline_rules import clock_words, duration_words
from voicegrow.tools.registry import ToolContext, ToolError, ToolSpec

__all__ = ["Announce", "Timer", "TimerBook", "TimerStore", "TimerTools", "reminder_text", "TIMER_STATES"]

log = logging.getLogger(__name__)

TIMER_KINDS = ("timer", "alarm")
TIMER_STATES = ("pending", "fired", "cancelled", "dropped")
MAX_TIMER_S = 7 * 86400
MAX_LABEL_CHARS = 40

#: Speak ``text`` in ``language`` on the device now, as a turn of its own (``data`` describes it).
Announce = Callable[[str, str, dict[str, Any]], Awaitable[None]]


@dataclass
class Timer:
    timer_id: str
    device_id: str
    kind: str  # timer | alarm
    due_at: float  # unix seconds
    created_at: float
    label: str = ""
    language: str = "zh"
    duration_s: int = 0  # what the user asked for (timers)
    state: str = "pending"
    fired_at: float | None = None

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Timer:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


class TimerStore(Protocol):
    """What the book needs from persistence (:class:`voicegrow.storage.Persistence` provides it)."""

    async def save_timer(self, row: dict[str, Any]) -> None: ...

    async def set_timer_state(self, timer_id: str, state: str, at: float) -> None: ...

    async def claim_timer(self, timer_id: str, state: str, at: float) -> bool | None: ...

    async def load_pending_timers(self) -> list[dict[str, Any]]: ...


class TimerBook:
    """The pending timers of this process, and the task that fires them (``run``)."""

    def __init__(self, store: TimerStore, find_speaker: Callable[[str], Announce | None], *, tz: tzinfo,
                 grace_s: float, max_per_device: int = 20, clock: Callable[[], float] = time.time,
                 load_wait: Callable[[], Awaitable[None]] | None = None,
                 on_event: Callable[[str, Timer, dict[str, Any]], Awaitable[None]] | None = None) -> None:
        self.store = store
        self.find_speaker = find_speaker
        self.tz = tz
        self.grace_s = grace_s
        self.max_per_device = max_per_device
        self.clock = clock
        self._load_wait = load_wait
        self._on_event = on_event
        self._timers: dict[str, Timer] = {}
        self._forgotten: set[str] = set()  # devices erased while a load was under way
        self._changed = trio.Event()
        self.loaded = trio.Event()

    # -- the book ------------------------------------------------------------------------------------

    def pending(self, device_id: str) -> list[Timer]:
        return sorted((t for t in self._timers.values() if t.device_id == device_id), key=lambda t: t.due_at)

    async def add(self, timer: Timer) -> None:
        if len(self.pending(timer.device_id)) >= self.max_per_device:
            raise ToolError(f"this speaker already has {self.max_per_device} timers; cancel one first")
        await self.store.save_timer(timer.row())
        self._timers[timer.timer_id] = timer
        self._wake()
        log.info("%s %s set for %s, due in %.0f s", timer.kind, timer.timer_id, timer.device_id,
                 timer.due_at - self.clock())

    async def cancel(self, timer: Timer) -> None:
        self._timers.pop(timer.timer_id, None)
        timer.state = "cancelled"
        await self.store.set_timer_state(timer.timer_id, "cancelled", self.clock())
        self._wake()

    def forget_device(self, device_id: str) -> None:
        """The device's data was erased: its timers go too (the rows are deleted by the store)."""
        if not self.loaded.is_set():
            self._forgotten.add(device_id)
        for timer in [t for t in self._timers.values() if t.device_id == device_id]:
            del self._timers[timer.timer_id]
        self._wake()

    def device_online(self, device_id: str) -> None:
        """A session of the device started: reminders held for it are due now."""
        if any(t.device_id == device_id for t in self._timers.values()):
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- running -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._load)
            task_status.started()
            await self._fire_forever()

    async def _load(self) -> None:
        """The stored pending timers, once the store answers (retried with backoff until it does)."""
        if self._load_wait is not None:
            with trio.move_on_after(15.0):
                await self._load_wait()  # the spool replays first: timers set just before a restart
        delay = 1.0
        while True:
            try:
                rows = await self.store.load_pending_timers()
                break
            except Exception as exc:  # BackendUnavailable and friends: try again later
                log.warning("could not load the stored timers (%s); retrying in %.0f s", exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 60.0)
        for row in rows:
            timer = Timer.from_row(row)
            if timer.timer_id not in self._timers and timer.device_id not in self._forgotten:
                self._timers[timer.timer_id] = timer
        self._forgotten.clear()
        log.info("timers loaded: %d pending", len(self._timers))
        self.loaded.set()
        self._wake()

    async def _fire_forever(self) -> None:
        while True:
            changed = self._changed
            now = self.clock()
            next_at = float("inf")
            for timer in sorted(self._timers.values(), key=lambda t: t.due_at):
                if timer.due_at > now:
                    next_at = min(next_at, timer.due_at)
                elif now > timer.due_at + self.grace_s:
                    await self._drop(timer, now)
                else:
                    announce = self.find_speaker(timer.device_id)
                    if announce is not None:
                        await self._fire(timer, announce, now)
                    else:  # held until the device comes back (device_online) or the grace ends
                        next_at = min(next_at, timer.due_at + self.grace_s)
            with trio.move_on_after(max(0.0, min(next_at - self.clock(), 3600.0))):
                await changed.wait()

    async def _fire(self, timer: Timer, announce: Announce, now: float) -> None:
        self._timers.pop(timer.timer_id, None)
        claimed = await self._claim(timer, "fired", now)
        if claimed is False:
            log.info("%s %s was fired or cancelled elsewhere", timer.kind, timer.timer_id)
            return
        timer.state, timer.fired_at = "fired", now
        late_s = max(0.0, now - timer.due_at)
        text = reminder_text(timer, datetime.fromtimestamp(timer.due_at, self.tz), late_s)
        log.info("firing %s %s on %s (%.1f s late)", timer.kind, timer.timer_id, timer.device_id, late_s)
        try:
            await announce(text, timer.language, {"kind": timer.kind, "timer_id": timer.timer_id,
                                                  "label": timer.label})
        except Exception:
            log.exception("could not speak %s %s on %s", timer.kind, timer.timer_id, timer.device_id)
        if claimed is None:
            await self.store.set_timer_state(timer.timer_id, "fired", now)
        await self._event("timer_fired", timer, {"late_s": round(late_s, 3)})

    async def _drop(self, timer: Timer, now: float) -> None:
        self._timers.pop(timer.timer_id, None)
        claimed = await self._claim(timer, "dropped", now)
        if claimed is False:
            return  # another process fired it (the device was connected there) or it was cancelled
        if claimed is None:
            await self.store.set_timer_state(timer.timer_id, "dropped", now)
        timer.state = "dropped"
        log.warning("%s %s of %s dropped: the device was offline from %s until the %g s grace ended",
                    timer.kind, timer.timer_id, timer.device_id,
                    datetime.fromtimestamp(timer.due_at, self.tz).isoformat(timespec="seconds"), self.grace_s)
        await self._event("timer_dropped", timer, {"due_at": timer.due_at})

    async def _claim(self, timer: Timer, state: str, now: float) -> bool | None:
        with trio.move_on_after(2.0):
            try:
                return await self.store.claim_timer(timer.timer_id, state, now)
            except Exception as exc:
                log.warning("could not claim %s %s (%s): going ahead", timer.kind, timer.timer_id, exc)
        return None

    async def _event(self, kind: str, timer: Timer, data: dict[str, Any]) -> None:
        if self._on_event is not None:
            try:
                await self._on_event(kind, timer, data)
            except Exception:
                log.exception("could not record %s", kind)


# -- what the speaker says ---------------------------------------------------------------------------


def reminder_text(timer: Timer, due_local: datetime, late_s: float = 0.0) -> str:
    zh = timer.language.startswith("zh")
    if timer.kind == "alarm":
        text = (f"现在是{clock_words(due_local, 'zh')}，{timer.label or '该起床了'}。" if zh
                else f"It's {clock_words(due_local, 'en')}. {timer.label or 'Time to get up!'}")
    else:
        length = duration_words(timer.duration_s, "zh" if zh else "en")
        if zh:
            text = f"时间到了！{timer.label}的计时结束了。" if timer.label else f"时间到了！{length}的计时结束了。"
        else:
            text = (f"Time's up! Your {timer.label} timer is done." if timer.label
                    else f"Time's up! The timer for {length} is done.")
    if late_s >= 60:
        minutes = round(late_s / 60)
        text += f"这个提醒晚了{minutes}分钟。" if zh else f" This reminder is {minutes} minutes late."
    return text


# -- the tools ----------------------------------------------------------------------------------------

_LABEL = {"type": "string", "maxLength": MAX_LABEL_CHARS, "description": "what it is for, in a few words"}
SET_TIMER = ToolSpec(
    "set_timer", "Start a countdown timer; the speaker says so when it ends (\"set a timer for 5 minutes\").",
    {"type": "object", "additionalProperties": False, "required": ["seconds"], "properties": {
        "seconds": {"type": "integer", "minimum": 1, "maximum": MAX_TIMER_S, "description": "the duration"},
        "label": _LABEL}},
    mutating=True)
SET_ALARM = ToolSpec(
    "set_alarm", "Set an alarm at a local time of day, the next time that time comes (\"wake me at 7\").",
    {"type": "object", "additionalProperties": False, "required": ["time"], "properties": {
        "time": {"type": "string", "pattern": "^([01]?[0-9]|2[0-3]):[0-5][0-9]$",
                 "description": "24-hour local time HH:MM"},
        "label": _LABEL}},
    mutating=True)
CANCEL_TIMER = ToolSpec(
    "cancel_timer", "Cancel a timer or alarm: the one with timer_id, else the next one of that kind, or all.",
    {"type": "object", "additionalProperties": False, "properties": {
        "timer_id": {"type": "string", "maxLength": 64},
        "kind": {"type": "string", "enum": ["timer", "alarm", "any"]},
        "all": {"type": "boolean"}}},
    mutating=True)
LIST_TIMERS = ToolSpec("list_timers", "The timers and alarms that are set on this speaker, soonest first.")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _label(arguments: dict[str, Any]) -> str:
    return _CONTROL.sub(" ", str(arguments.get("label") or "")).strip()[:MAX_LABEL_CHARS]


class TimerTools:
    """set_timer, set_alarm, cancel_timer, list_timers over a :class:`TimerBook`."""

    def __init__(self, book: TimerBook) -> None:
        self.book = book

    def list_tools(self) -> Sequence[ToolSpec]:
        return (SET_TIMER, SET_ALARM, CANCEL_TIMER, LIST_TIMERS)

    async def call(self, name: str, arguments: dict[str, Any], context: ToolContext) -> Any:
        book = self.book
        now = context.now()
        if name == "set_timer":
            seconds = int(arguments["seconds"])
            timer = Timer(uuid.uuid4().hex[:12], context.device_id, "timer", now.timestamp() + seconds,
                          now.timestamp(), _label(arguments), context.language, duration_s=seconds)
            await book.add(timer)
            return {"timer_id": timer.timer_id, "seconds": seconds, "ends_at": _local(timer, context)}
        if name == "set_alarm":
            hour, minute = (int(part) for part in arguments["time"].split(":"))
            due = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
            if due <= now:
                due += timedelta(days=1)
            timer = Timer(uuid.uuid4().hex[:12], context.device_id, "alarm", due.timestamp(), now.timestamp(),
                          _label(arguments), context.language)
            await book.add(timer)
            return {"timer_id": timer.timer_id, "rings_at": due.isoformat(timespec="minutes"),
                    "day": "today" if due.date() == now.date() else "tomorrow"}
        if name == "cancel_timer":
            pending = book.pending(context.device_id)
            kind = arguments.get("kind", "any")
            if arguments.get("timer_id"):
                chosen = [t for t in pending if t.timer_id == arguments["timer_id"]]
            else:
                matching = [t for t in pending if kind == "any" or t.kind == kind]
                chosen = matching if arguments.get("all") else matching[:1]
            if not chosen:
                raise ToolError("there is no such timer or alarm on this speaker")
            for timer in chosen:
                await book.cancel(timer)
            return {"cancelled": [self._describe(t, context) for t in chosen]}
        if name == "list_timers":
            return {"timers": [self._describe(t, context) for t in book.pending(context.device_id)]}
        raise ToolError(f"unknown timer tool {name!r}")

    @staticmethod
    def _describe(timer: Timer, context: ToolContext) -> dict[str, Any]:
        return {"timer_id": timer.timer_id, "kind": timer.kind, "label": timer.label,
                "at": _local(timer, context), "remaining_s": max(0, round(timer.due_at - context.now().timestamp()))}


def _local(timer: Timer, context: ToolContext) -> str:
    return datetime.fromtimestamp(timer.due_at, context.tz).isoformat(timespec="seconds")
