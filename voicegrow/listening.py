"""When heard speech may become a turn: listening modes (``LISTEN_MODE``), wake windows, follow-ups.

A speaker in a living room hears the television, the family and itself all day. In ``always`` mode
every utterance the VAD cuts is a turn (the behaviour of a microphone on a desk); in ``wake`` mode an
utterance is a turn only when a wake signal came with it (open-xiaoai's ``kws`` event or its built-in
assistant waking, a native ``listen_start``, xiaozhi's ``detect``) or when it begins within
``FOLLOW_UP_S`` of the end of the last reply; in ``push_to_talk`` only what is said while the button is
held (``listen_start`` … ``listen_stop``) counts.

:class:`ListenGate` is sans-IO: positions are seconds of microphone audio since the stream start (the
VAD's clock), so the decision is the same whether audio arrives in real time or faster, and the session
core asks it at three points: may this utterance be transcribed speculatively, may it barge in, and
does it become a turn (with how much of its audio kept).
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = [
    "DEFAULT_LISTEN_MODES",
    "parse_mode",
    "ListenGate",
    "ListenMode",
    "ListenModeError",
    "parse_listen_mode_devices",
    "resolve_listen_mode",
]


class ListenMode(str, enum.Enum):
    WAKE = "wake"
    ALWAYS = "always"
    PUSH_TO_TALK = "push_to_talk"


#: ``LISTEN_MODE=auto``: what each kind of device gets. open-xiaoai speakers sit in living rooms with a
#: microphone that is always open, so they wait for the wake word; native devices and the browser page
#: start their session on a button (the talk page's Talk) and xiaozhi boards open the microphone only
#: after their own wake word or button, so both listen to everything they send.
DEFAULT_LISTEN_MODES: dict[str, ListenMode] = {
    "xiaoai": ListenMode.WAKE,
    "native": ListenMode.ALWAYS,
    "xiaozhi": ListenMode.ALWAYS,
}

#: A follow-up may begin this much before the reply's end is noticed (the last audio still playing).
_FOLLOW_UP_EARLY_S = 0.3

_CHOICES = tuple(m.value for m in ListenMode)


class ListenModeError(ValueError):
    """A listening mode that does not exist (a setting or a device's hello)."""


def parse_mode(text: str, what: str) -> ListenMode:
    try:
        return ListenMode(text.strip())
    except ValueError:
        raise ListenModeError(f"{what}={text!r}: expected one of {', '.join(_CHOICES)}") from None


def parse_listen_mode_devices(text: str) -> dict[str, ListenMode]:
    """``LISTEN_MODE_DEVICES``: ``device_id=mode`` pairs separated by commas."""
    modes: dict[str, ListenMode] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        device_id, sep, mode = part.partition("=")
        if not sep or not device_id.strip():
            raise ListenModeError(f"{part!r}: expected device_id=mode")
        modes[device_id.strip()] = parse_mode(mode, device_id.strip())
    return modes


def resolve_listen_mode(*, setting: str, devices: str, protocol: str, device_id: str,
                        requested: ListenMode | None = None, override: ListenMode | None = None) -> ListenMode:
    """The mode of one session: the mode an operator set for the device through the admin API
    (``override``, the latest and most deliberate choice) first, then the per-device setting
    (``LISTEN_MODE_DEVICES``), then what the device asked for in its hello, then ``LISTEN_MODE``, then
    the default of its kind."""
    if override is not None:
        return override
    chosen = parse_listen_mode_devices(devices).get(device_id)
    if chosen is not None:
        return chosen
    if requested is not None:
        return requested
    if setting != "auto":
        return parse_mode(setting, "LISTEN_MODE")
    return DEFAULT_LISTEN_MODES.get(protocol, ListenMode.ALWAYS)


@dataclasses.dataclass
class _Window:
    """Utterances whose speech begins from ``starts_from`` to ``open_until`` and ends after
    ``opened_at`` are heard; their audio is kept from ``keep_from`` on (the pre-roll before a wake
    signal: the question may have begun with the wake word, before the signal arrived)."""

    opened_at: float
    open_until: float
    keep_from: float
    starts_from: float = float("-inf")


class ListenGate:
    """Decides which utterances become turns, by listening mode (see the module docstring).

    In ``wake`` and ``push_to_talk`` a window is used up by the utterance it lets through, and the
    user's voice does not interrupt a reply (the television would): a wake signal does.
    """

    def __init__(self, mode: ListenMode, *, follow_up_s: float, wake_preroll_s: float) -> None:
        self.mode = mode
        self.follow_up_s = follow_up_s
        self.wake_preroll_s = wake_preroll_s
        self._window: _Window | None = None
        self.ignored = 0  # utterances heard and not let through

    # -- signals ---------------------------------------------------------------------------------

    def wake(self, at_s: float) -> None:
        """A wake word or a button press heard at stream position ``at_s``."""
        if self.mode is ListenMode.ALWAYS:
            return
        until = float("inf") if self.mode is ListenMode.PUSH_TO_TALK else at_s + self.follow_up_s
        self._window = _Window(opened_at=at_s, open_until=until, keep_from=max(0.0, at_s - self.wake_preroll_s))

    def release(self, at_s: float) -> None:
        """Push-to-talk: the button was let go; speech beginning after this is not heard."""
        if self._window is not None and self.mode is ListenMode.PUSH_TO_TALK:
            self._window.open_until = min(self._window.open_until, at_s)

    def reply_ended(self, at_s: float) -> None:
        """A reply finished playing: in ``wake`` mode the user may go on without the wake word."""
        if self.mode is not ListenMode.WAKE or self.follow_up_s <= 0:
            return
        window = self._window
        if window is not None and window.open_until >= at_s:  # woken again meanwhile (a wake interrupts)
            window.open_until = max(window.open_until, at_s + self.follow_up_s)
            return
        # Speech that began while the reply played is the reply (its echo) or talk over it, not an answer.
        self._window = _Window(opened_at=at_s, open_until=at_s + self.follow_up_s, keep_from=0.0,
                               starts_from=at_s - _FOLLOW_UP_EARLY_S)

    # -- decisions -------------------------------------------------------------------------------

    @property
    def allows_barge_in(self) -> bool:
        return self.mode is ListenMode.ALWAYS

    def may_be_heard(self, start_s: float) -> bool:
        """Could the open utterance (speech since ``start_s``) still become a turn? A speculative
        transcription of one that cannot is wasted work."""
        window = self._window
        return self.mode is ListenMode.ALWAYS or (window is not None and start_s <= window.open_until)

    def admit(self, start_s: float, end_s: float) -> float | None:
        """Does the utterance (speech from ``start_s`` to ``end_s``) become a turn? ``None``: no;
        else the position its audio is kept from (0 for all of it)."""
        if self.mode is ListenMode.ALWAYS:
            return 0.0
        window = self._window
        if (window is None or start_s > window.open_until or start_s < window.starts_from
                or end_s < window.opened_at):
            self.ignored += 1
            return None
        self._window = None
        return window.keep_from

    def listening(self, at_s: float) -> bool:
        """Speech beginning at ``at_s`` would be heard (for the console's live state)."""
        window = self._window
        return self.mode is ListenMode.ALWAYS or (window is not None and window.starts_from <= at_s <= window.open_until)
