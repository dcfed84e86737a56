"""JSON as the devices' own parsers read it, for every device codec.

Python's ``json`` reads ``1e400`` as infinity and ``"\\ud800"`` as a string holding a lone surrogate.
The speakers' parsers (serde_json on open-xiaoai, cJSON on xiaozhi boards) refuse both, and neither can
be encoded back into valid UTF-8 JSON, so a codec that accepted them would hold a message it cannot
answer with. Each codec maps these refusals to its own error codes; the rules live here once.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["LoneSurrogate", "NumberOutOfRange", "loads", "refuse_lone_surrogates"]


class NumberOutOfRange(ValueError):
    """A number beyond a double (serde_json: "number out of range")."""


class LoneSurrogate(ValueError):
    """A string (or key) holding a surrogate code point on its own."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NumberOutOfRange(f"number out of range: {text[:40]}")
    return value


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(text: str) -> Any:
    """The value of ``text``. Raises :class:`NumberOutOfRange`, ``ValueError`` for anything that is not
    JSON (NaN and Infinity included), and ``RecursionError`` for nesting beyond Python's stack. Lone
    surrogates are left to :func:`refuse_lone_surrogates`, so that a codec may check the shape first."""
    return _DECODER.decode(text)


def refuse_lone_surrogates(text: str, value: Any) -> None:
    """Raise :class:`LoneSurrogate` if any string or key of ``value`` (decoded from ``text``) holds one.

    Only a ``\\u`` escape or non-ASCII text can produce one, so plain ASCII messages (nearly all audio
    frames) are not walked at all."""
    if text.isascii() and "\\u" not in text:
        return
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                raise LoneSurrogate("a string holds a lone surrogate")
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
