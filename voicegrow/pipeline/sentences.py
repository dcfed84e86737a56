"""Turn an LLM token stream into speakable chunks, each sent to TTS as soon as it is complete.

The first audio of a reply can start only when the first chunk is cut, so chunks are cut as early as
the text allows: at the end of a sentence (Chinese ``。！？；…``, full-width and ASCII variants,
English ``.!?;`` followed by a space), at a newline, and for the very first chunk also at a comma or
colon (``，、,：:``) once it has a few characters; a short first sentence ("好的。", "Sure.") is a chunk
of its own, so the reply starts while the next sentence is still being generated. English needs care: decimals (3.14), abbreviations
(Mr. e.g. U.S.), initials, URLs and e-mail addresses, numbered list items ("1. ") and a lower-case
word after a full stop do not end a sentence; closing quotes and brackets right after a terminator
belong to the sentence they close. Chunks shorter than ``min_chars`` are merged with what follows;
a run-on longer than ``max_chars`` is cut at its last comma or space.

Markdown that an LLM likes to produce (``**``, ``#`` headings, backticks and code fences, list
bullets, ``>`` quotes, ``---`` rules) is stripped first, since a TTS voice would read it aloud.

Every decision depends only on the text, never on how it was cut into deltas: where a decision needs
a character that has not arrived yet (is the ``.`` followed by a space? by ``"``?), the splitter waits
for it, and :meth:`SentenceSplitter.flush` decides the rest with the end of the text as the
lookahead. So the same reply always yields the same chunks, and no letter, digit or ideograph is
lost or repeated; only markup and whitespace change (whitespace inside a chunk becomes one space).
"""

from __future__ import annotations

import re

from voicegrow.language import is_cjk

__all__ = ["SentenceSplitter", "MarkdownStripper"]

# Sentence terminators: CJK ones end a sentence wherever they stand, ASCII ones only before a space,
# a CJK character or the end of the text.
_CJK_TERMINATORS = frozenset("。！？；…｡")
_ASCII_TERMINATORS = frozenset(".!?;")
_ALL_TERMINATORS = _CJK_TERMINATORS | _ASCII_TERMINATORS
_CLOSERS = frozenset("\"'”’」』）)】]》>")
_FIRST_CHUNK_COMMAS = frozenset("，、,：:")
_SOFT_BREAKS = frozenset("，、,；;：:")

#: Words that end with a full stop without ending the sentence ("Dr. Smith", "No. 5").
_TITLES = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "no", "vol", "fig", "vs", "gen", "gov",
    "sen", "rep", "capt", "lt", "col", "sgt", "rev", "hon", "messrs",
})
_DOTTED_ABBREVIATION = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]")  # e.g, i.e, U.S, a.m, Ph.D
_LEADING_OPENERS = "\"'“‘「『（(【[《<"
_WAIT = None  # a decision needs text that has not arrived yet


def _no_space_script(char: str) -> bool:
    """CJK letters and full-width punctuation: text where a sentence may end without a space."""
    return is_cjk(char) or "\u3000" <= char <= "\u303f" or "\uff00" <= char <= "\uffef"


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _speakable(text: str) -> bool:
    return any(char.isalnum() for char in text)


class MarkdownStripper:
    """Remove Markdown markup from a text stream, deciding each character once enough text is seen.

    Dropped: heading marks (``#`` … at a line start), list bullets (``-``/``*``/``+`` and a space at a
    line start), ``>`` quote marks, code fence lines, horizontal rules, backticks, ``**``/``__`` and
    single ``*``/``_`` used for emphasis, line indentation. Kept: numbered list labels ("1."),
    ``*`` as a multiplication sign ("2 * 3"), ``_`` inside a word (snake_case), ``#`` inside a line.
    """

    def __init__(self) -> None:
        self._pending = ""
        self._at_line_start = True
        self._last_out = ""

    def feed(self, delta: str) -> str:
        self._pending += delta
        return self._run(final=False)

    def flush(self) -> str:
        out = self._run(final=True)
        self._pending, self._at_line_start, self._last_out = "", True, ""
        return out

    def _run(self, *, final: bool) -> str:
        text, out, i = self._pending, [], 0
        while i < len(text):
            if self._at_line_start:
                step = self._line_prefix(text, i, final)
                if step is _WAIT:
                    break
                self._at_line_start = step > i and text[step - 1] == "\n"  # a dropped line
                i = step
                continue
            char = text[i]
            if char == "\n":
                out.append(char)
                self._at_line_start = True
                i += 1
            elif char == "`":
                i += 1
            elif char in "*_":
                end = i
                while end < len(text) and text[end] == char:
                    end += 1
                if end == len(text) and not final:
                    break
                before = out[-1] if out else self._last_out
                after = text[end] if end < len(text) else ""
                if end - i == 1 and self._single_mark_is_text(char, before, after):
                    out.append(char)
                i = end
            else:
                out.append(char)
                i += 1
            if out:
                self._last_out = out[-1]
        self._pending = text[i:]
        return "".join(out)

    @staticmethod
    def _single_mark_is_text(char: str, before: str, after: str) -> bool:
        if char == "*":  # "2 * 3", "2*3": arithmetic, not emphasis
            return (before.isspace() and after.isspace()) or (before.isdigit() and after.isdigit())
        return before.isalnum() and after.isalnum()  # snake_case

    @staticmethod
    def _line_prefix(text: str, start: int, final: bool) -> int | None:
        """Index after the markup that opens the line at ``start`` (to be dropped), or _WAIT."""
        i = start
        while i < len(text) and text[i] in " \t":
            i += 1
        if i == len(text):
            return i if final else _WAIT
        line_end = text.find("\n", i)
        line = text[i:] if line_end < 0 else text[i:line_end]
        if line.startswith("```") or _is_rule(line):  # a fence or a rule: drop the whole line
            if line_end < 0 and not final:
                return _WAIT
            return len(text) if line_end < 0 else line_end + 1
        if line_end < 0 and not final and ("```".startswith(line) or _may_become_rule(line)):
            return _WAIT
        char = text[i]
        if char == "#":
            end = i
            while end < len(text) and text[end] == "#":
                end += 1
            if end == len(text):
                return i if final else _WAIT
            return end + 1 if text[end] in " \t" and end - i <= 6 else i
        if char in "-*+":
            if i + 1 == len(text):
                return i if final else _WAIT
            return i + 2 if text[i + 1] in " \t" else i
        if char == ">":
            return i + 1
        return i


def _is_rule(line: str) -> bool:
    """A Markdown horizontal rule: three or more of one of ``-*_``, spaces allowed between."""
    marks = line.replace(" ", "").replace("\t", "")
    return len(marks) >= 3 and marks[0] in "-*_" and marks == marks[0] * len(marks)


def _may_become_rule(line: str) -> bool:
    marks = line.replace(" ", "").replace("\t", "")
    return 0 < len(marks) < 3 and marks[0] in "-*_" and marks == marks[0] * len(marks)


class SentenceSplitter:
    """Cut streamed text into chunks for TTS (see the module docstring for the rules).

    ``min_chars``: a boundary is skipped while the chunk would be shorter (tiny chunks are merged
    forward). ``max_chars``: a chunk with no boundary is cut at its last soft break (comma, space).
    ``first_chunk_comma``: the first chunk of a reply may end at a comma once it has
    ``first_chunk_min_chars`` characters, so speech starts sooner. Lengths count characters of the
    normalized chunk; a chunk runs past ``max_chars`` only by the terminators and closing quotes that
    end it. ``first_sentence_min_chars`` (default ``min_chars``): how short the first chunk may be when
    it ends a sentence, so that "好的。" or "Sure." is spoken on its own while the rest is generated
    (merged into the next clause it waited ~12 more tokens, 0.2–0.3 s). After :meth:`flush` the
    splitter starts a new reply.
    """

    def __init__(self, *, min_chars: int = 6, max_chars: int = 100, first_chunk_comma: bool = True,
                 first_chunk_min_chars: int = 4, first_sentence_min_chars: int | None = 2) -> None:
        if not 1 <= min_chars <= max_chars:
            raise ValueError(f"need 1 <= min_chars <= max_chars, got {min_chars}, {max_chars}")
        if first_sentence_min_chars is not None and not 1 <= first_sentence_min_chars <= max_chars:
            raise ValueError(f"need 1 <= first_sentence_min_chars <= max_chars, got {first_sentence_min_chars}")
        self.min_chars, self.max_chars = min_chars, max_chars
        self.first_chunk_comma = first_chunk_comma
        self.first_chunk_min_chars = first_chunk_min_chars
        self.first_sentence_min_chars = min_chars if first_sentence_min_chars is None else first_sentence_min_chars
        self._markdown = MarkdownStripper()
        self._reset()

    def _reset(self) -> None:
        self._buffer = ""  # cleaned text not yet emitted
        self._scanned = 0  # positions before this are known not to end a chunk
        self._emitted_any = False
        self._line_has_text = False  # text before the buffer on the buffer's first line

    def feed(self, delta: str) -> list[str]:
        """Add an LLM delta; return the chunks that are now complete (often none)."""
        self._buffer += self._markdown.feed(delta)
        return self._split(final=False)

    def flush(self) -> list[str]:
        """End of the reply: return the remaining chunks, including a last one of any length."""
        self._buffer += self._markdown.flush()
        chunks = self._split(final=True)
        tail = _normalize(self._buffer)
        if _speakable(tail):
            chunks.append(tail)
        self._reset()
        return chunks

    # -- cutting

    def _split(self, *, final: bool) -> list[str]:
        chunks = []
        while (cut := self._next_cut(final)) is not None:
            piece, self._buffer, self._scanned = self._buffer[:cut], self._buffer[cut:], 0
            newline = piece.rfind("\n")
            rest_of_line = piece[newline + 1:]
            self._line_has_text = bool(rest_of_line.strip()) or (newline < 0 and self._line_has_text)
            chunk = _normalize(piece)
            if _speakable(chunk):
                chunks.append(chunk)
                self._emitted_any = True
        return chunks

    def _next_cut(self, final: bool) -> int | None:
        """Where the next chunk ends in the buffer, or None while that is not known yet."""
        text, i = self._buffer, self._scanned
        while i < len(text):
            if i >= self.max_chars:
                return self._run_on_cut()
            end = self._boundary_after(i, final)
            if end is _WAIT:
                self._scanned = i
                return None
            if end < 0:
                i += 1
                continue
            is_comma = text[i] in _FIRST_CHUNK_COMMAS
            if is_comma:
                needed = self.first_chunk_min_chars
            elif text[i] == "\n":
                needed = self.min_chars  # a list's lines are no opener
            else:
                needed = self.min_chars if self._emitted_any else self.first_sentence_min_chars
            if len(_normalize(text[:end])) >= needed:
                return end
            i = end
        self._scanned = i
        return None

    def _boundary_after(self, i: int, final: bool) -> int | None:
        """If a chunk may end at ``text[i]``: the index after it (closers included); -1 if not."""
        text = self._buffer
        char = text[i]
        if char == "\n":
            return i + 1
        if char in _FIRST_CHUNK_COMMAS and self.first_chunk_comma and not self._emitted_any:
            if char in ",:":  # ASCII: only before a space or CJK (not 3,000 or 7:30)
                if i + 1 == len(text):
                    return i + 1 if final else _WAIT
                return i + 1 if text[i + 1].isspace() or _no_space_script(text[i + 1]) else -1
            return i + 1
        if char not in _ALL_TERMINATORS:
            return -1
        end = i + 1
        while end < len(text) and text[end] in _ALL_TERMINATORS:
            end += 1
        while end < len(text) and text[end] in _CLOSERS:
            end += 1
        if end == len(text):
            return end if final else _WAIT
        if char in _CJK_TERMINATORS:
            return end
        following = text[end]
        if not (following.isspace() or _no_space_script(following)):
            return -1  # 3.14, example.com, "?x=1"
        if char == ".":
            if end - i == 1 and self._is_abbreviation_or_label(i):
                return -1
            after = end
            while after < len(text) and text[after] in " \t":
                after += 1
            if after == len(text):
                return end if final else _WAIT
            if text[after].islower() and text[after].isascii():
                return -1  # "approx. five", "etc. and": the sentence goes on
        return end

    def _is_abbreviation_or_label(self, dot: int) -> bool:
        """The word before the full stop at ``dot`` is a title, an initial, a dotted abbreviation or a
        list label at the start of its line."""
        text = self._buffer
        start = dot
        while start > 0 and not text[start - 1].isspace():
            start -= 1
        word = text[start:dot].lstrip(_LEADING_OPENERS)
        if not word:
            return False
        if word.lower() in _TITLES or _DOTTED_ABBREVIATION.fullmatch(word):
            return True
        if len(word) == 1 and word.isupper():
            return True  # "J. K. Rowling"
        if word.isdigit():
            line_start = text.rfind("\n", 0, start) + 1
            line_has_text = bool(text[line_start:start].strip())
            if line_start == 0:
                line_has_text = line_has_text or self._line_has_text
            return not line_has_text  # "1. Open the app"
        return False

    def _run_on_cut(self) -> int:
        """Cut a chunk that reached ``max_chars`` without a boundary: at a late comma, else the last
        space, else any comma, else hard at ``max_chars`` (CJK text without punctuation, a URL)."""
        window = self._buffer[: self.max_chars]
        commas, spaces = [], []
        for k, char in enumerate(window):
            if len(_normalize(window[: k + 1])) < self.min_chars:
                continue
            if char in _SOFT_BREAKS and (char not in ",;:" or k + 1 < len(self._buffer)
                                         and self._buffer[k + 1].isspace()):
                commas.append(k + 1)
            elif char.isspace():
                spaces.append(k)
        late_commas = [k for k in commas if k >= self.max_chars // 2]
        for candidates in (late_commas, spaces, commas):
            if candidates:
                return candidates[-1]
        return self.max_chars
