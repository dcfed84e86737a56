"""Which language a text is in, as far as the server cares: Chinese or English.

The answer picks the TTS voice for a sentence and the language of a spoken apology. An English voice
cannot read Chinese characters at all, while a Chinese voice reads a few English words tolerably,
so the decision leans towards Chinese: a Chinese character counts as much as an English *word*, and a
text is Chinese once a quarter of those units are Chinese ("播放 Taylor Swift 的歌" is Chinese,
"Play the song by 周杰伦 please" is Chinese too, a long English paragraph quoting one name is not).
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["Language", "detect_language", "is_cjk"]

Language = Literal["zh", "en"]

#: Share of CJK characters among (CJK characters + Latin words) from which a text counts as Chinese.
ZH_SHARE = 0.25

_LATIN_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


def is_cjk(char: str) -> bool:
    """A CJK ideograph, kana or hangul syllable: a letter of a script written without spaces."""
    code = ord(char)
    return (0x3040 <= code <= 0x30FF or 0x3400 <= code <= 0x4DBF or 0x4E00 <= code <= 0x9FFF
            or 0xAC00 <= code <= 0xD7AF or 0xF900 <= code <= 0xFAFF or 0x20000 <= code <= 0x2FA1F)


def detect_language(text: str, default: Language = "en") -> Language:
    """``"zh"`` or ``"en"`` for a transcript or a reply sentence; ``default`` when it has no letters."""
    cjk = sum(1 for char in text if is_cjk(char))
    latin_words = len(_LATIN_WORD.findall(text))
    if cjk + latin_words == 0:
        return default
    return "zh" if cjk / (cjk + latin_words) >= ZH_SHARE else "en"
