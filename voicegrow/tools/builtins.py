"""The tools every speaker has: stop the reply, change the volume, tell the time and date.

Timers and alarms live in :mod:`voicegrow.tools.timers`; they need the scheduler's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from voicegrow.tools.registry import DeviceVolume, ToolContext, ToolError, ToolSpec

__all__ = ["BuiltinTools", "VOLUME_STEP", "DEFAULT_VOLUME"]

#: How far "louder" / "softer" moves the volume, in percent.
VOLUME_STEP = 15
#: The level assumed for a relative change before the server has set one on this device.
DEFAULT_VOLUME = 50

STOP = ToolSpec(
    "stop", "Stop or pause talking at once, say nothing more (the user said stop, quiet, pause, 停, 别说了, 暂停).")
GET_TIME = ToolSpec("get_time", "The current local date, time and weekday where the speaker is.")
VOLUME = ToolSpec(
    "set_volume",
    "Change the speaker's volume: up (louder), down (softer) by a step, or set it to a level from 0 to 100.",
    {"type": "object", "additionalProperties": False, "required": ["action"], "properties": {
        "action": {"type": "string", "enum": ["up", "down", "set"]},
        "level": {"type": "integer", "minimum": 0, "maximum": 100,
                  "description": "the level in percent; only with action set"},
    }},
    mutating=True, timeout_s=12.0)


class BuiltinTools:
    """Stop, volume and time. The device's volume is remembered per device, for relative changes."""

    def __init__(self) -> None:
        self._volumes: dict[str, int] = {}

    def list_tools(self) -> Sequence[ToolSpec]:
        return (STOP, GET_TIME, VOLUME)

    async def call(self, name: str, arguments: dict[str, Any], context: ToolContext) -> Any:
        if name == "stop":
            context.silenced = True
            return {"stopped": True}
        if name == "get_time":
            now = context.now()
            return {"iso": now.isoformat(timespec="seconds"), "weekday": now.strftime("%A"),
                    "time_zone": str(now.tzinfo)}
        if name == "set_volume":
            return await self._volume(arguments, context)
        raise ToolError(f"unknown built-in tool {name!r}")

    async def _volume(self, arguments: dict[str, Any], context: ToolContext) -> dict[str, Any]:
        device = context.device
        if not isinstance(device, DeviceVolume):
            raise ToolError("this device cannot change its volume")
        action = arguments["action"]
        current = self._volumes.get(context.device_id, DEFAULT_VOLUME)
        if action == "set":
            if "level" not in arguments:
                raise ToolError("action set needs a level from 0 to 100")
            level = arguments["level"]
        else:
            level = current + (VOLUME_STEP if action == "up" else -VOLUME_STEP)
        level = max(0, min(100, int(level)))
        try:
            await device.set_volume(level)
        except ToolError:
            raise
        except Exception as exc:  # the speaker refused or is gone; the model tells the user
            raise ToolError(f"the speaker did not change its volume: {exc}"[:300]) from exc
        self._volumes[context.device_id] = level
        return {"volume": level, "previous": current}
