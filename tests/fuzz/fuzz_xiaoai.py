"""Fuzz target: the open-xiaoai decoders, ``decode_text`` (as str and as bytes) and ``decode_binary``.

A finding is any exception other than :class:`XiaoaiError`, a decoded message that does not survive
encode → decode unchanged, or two ways of reading the same input disagreeing: text as bytes and as
str, and a Stream through the fast path and (with a leading space, which JSON allows and the fast
path does not take) through ``json.loads``.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["voicegrow.protocol"]):
    from voicegrow.protocol import xiaoai as proto

from tests.fuzz import JSON_TOKENS, all_checks, outcome, run_target


#: Inputs that once were findings; they stay in every run's corpus, so a regression crashes at once.
REGRESSIONS = (
    # 1e400 decoded as inf (serde_json refuses it: "number out of range"), then failed to re-encode.
    b'{"Event":{"id":"1","event":"e","data":1e400}}',
    b'{"id":"1","tag":"play","bytes":[],"data":-1e400}',
    # A lone surrogate escape in a nested value was accepted (serde_json refuses it), then failed to
    # re-encode; only the string fields (id, command, ...) were checked.
    b'{"Response":{"id":"R4","data":"1.0.\\ud8000"}}',
    b'{"id":"1","tag":"play","bytes":[],"data":{"\\udc00":1}}',
)


def seeds() -> list[bytes]:
    """The golden messages of the codec's tests, a long record frame, and a request of each kind."""
    from tests.test_protocol_xiaoai import GOLDEN_TEXT

    texts = [text.encode("utf-8") for _, text in GOLDEN_TEXT]
    requests = [proto.start_recording(), proto.stop_recording(), proto.start_play(), proto.stop_play(),
                proto.get_version(), proto.run_shell(proto.DEVICE_INFO_COMMAND)]
    numbers = proto.Event("E7", "custom", {"f": -1.5e300, "i": 2**70, "list": [0.25, -7, False]})
    texts += [proto.encode_text(message).encode("utf-8") for message in (*requests, numbers)]
    streams = [
        proto.encode_stream(proto.Stream("0f8fad5b-d9cb-469f-a165-70867728950e", proto.RECORD_TAG, bytes(range(256)))),
        proto.encode_stream(proto.Stream("S2", proto.PLAY_TAG, b"")),
        proto.encode_stream(proto.Stream("S3", proto.PLAY_TAG, b"\x07", {"b": 1, "a": [True, None]})),
        b' {"tag":"play","bytes":[ 1 , 2 ],"id":"s","data":null,"more":{}} ',
    ]
    return texts + streams + list(REGRESSIONS)


#: The message shapes' keys and values, as tokens for the fuzzer's dictionary.
TOKENS = (*JSON_TOKENS, '"Request"', '"Response"', '"Event"', '"Stream"', '"id"', '"command"', '"payload"',
          '"code"', '"msg"', '"data"', '"event"', '"tag"', '"bytes"', '"record"', '"play"', "255", "256")


def _check_text(data: bytes) -> None:
    as_bytes = outcome(proto.decode_text, data)
    # Invalid UTF-8 becomes lone surrogates here: the str path must refuse those, not crash on them.
    text = data.decode("utf-8", errors="surrogateescape")
    as_str = outcome(proto.decode_text, text)
    if not isinstance(as_bytes, proto.XiaoaiErrorCode) and as_str != as_bytes:
        raise AssertionError(f"decode_text disagrees on bytes and str: {as_bytes!r} vs {as_str!r}")
    if isinstance(as_bytes, (proto.Request, proto.Response, proto.Event)):
        again = proto.decode_text(proto.encode_text(as_bytes))
        if again != as_bytes:
            raise AssertionError(f"text round trip changed the message: {as_bytes!r} -> {again!r}")


def _check_binary(data: bytes) -> None:
    direct = outcome(proto.decode_binary, data)
    general = outcome(proto.decode_binary, b" " + data)
    if direct != general and len(data) < proto.MAX_MESSAGE_BYTES:
        raise AssertionError(f"fast and general Stream paths disagree: {direct!r} vs {general!r}")
    if isinstance(direct, proto.Stream):
        again = proto.decode_binary(proto.encode_stream(direct))
        if again != direct:
            raise AssertionError(f"stream round trip changed the frame: {direct!r} -> {again!r}")


fuzz_one_input = all_checks(_check_text, _check_binary)

if __name__ == "__main__":
    run_target(sys.argv, fuzz_one_input, seeds(), TOKENS)
