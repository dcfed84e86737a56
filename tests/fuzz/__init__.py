"""Coverage-guided fuzz targets (atheris) for the sans-IO codecs; ``tests/test_fuzz.py`` runs them.

Each target is a script: ``python -m tests.fuzz.fuzz_native [libFuzzer flags] CORPUS_DIR``. It
writes its seed corpus into ``CORPUS_DIR`` first (generated from valid frames, never checked in), so
the fuzzer starts from inputs that already reach deep into the decoders.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["JSON_TOKENS", "all_checks", "outcome", "run_target"]


def _corpus_dirs(argv: Sequence[str]) -> list[Path]:
    """libFuzzer's positional arguments (corpus directories); flags start with '-'."""
    return [Path(arg) for arg in argv[1:] if not arg.startswith("-")]


#: Tokens of JSON's grammar (after AFL's json.dict): mutations that splice whole tokens reach number
#: and escape edge cases that byte flips rarely build.
JSON_TOKENS = ("{", "}", "[", "]", ",", ":", '"', "\\", "\\u", "\\ud800", "true", "false", "null", "-",
               "0", "1.0", "e", "E", "e+", "e-", "E+", "E-", "999", " ", "\t", "NaN", "Infinity")


def _dictionary_line(token: str | bytes) -> str:
    raw = token.encode("utf-8") if isinstance(token, str) else token
    return '"' + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in raw) + '"'


def outcome(decode: Callable[[Any], Any], raw: Any) -> Any:
    """The decoded value, or the codec error's code: what two equivalent inputs must agree on."""
    from voicegrow.protocol.errors import CodecError  # here: a target imports the codecs instrumented first

    try:
        return decode(raw)
    except CodecError as exc:
        return exc.code


def all_checks(*checks: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """One fuzz input function running every check on the same bytes."""

    def fuzz_one_input(data: bytes) -> None:
        for check in checks:
            check(data)

    return fuzz_one_input


def run_target(argv: list[str], fuzz_one_input: Callable[[bytes], None], seeds: Sequence[bytes],
               dictionary: Sequence[str | bytes] = ()) -> None:
    """Seed the first corpus directory and write the token dictionary next to it, then fuzz.

    Seeds are named by their content, so running again into the same directory adds nothing.
    Given input files instead of a directory, libFuzzer runs just those (to reproduce a finding).
    """
    import atheris

    dirs = _corpus_dirs(argv)
    if dirs and not dirs[0].is_file():  # a file argument replays one input (a crash) instead
        dirs[0].mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            (dirs[0] / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)
        if dictionary and not any(arg.startswith("-dict=") for arg in argv):
            path = dirs[0].with_name(dirs[0].name + ".dict")
            path.write_text("".join(_dictionary_line(t) + "\n" for t in dictionary), encoding="ascii")
            argv = [*argv[:1], f"-dict={path}", *argv[1:]]
    atheris.Setup(argv, fuzz_one_input)
    atheris.Fuzz()
