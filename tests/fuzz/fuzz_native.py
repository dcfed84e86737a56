"""Fuzz target: the native protocol's one-message decoder and its stream decoder.

A finding is any exception other than :class:`ProtocolError`, or a decoded frame that does not
survive ``encode`` → ``decode_message`` unchanged, or the two decoders disagreeing about a message
that holds exactly one frame. Run ``python -m tests.fuzz.fuzz_native -help=1`` for libFuzzer's flags.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["voicegrow.protocol"]):
    from voicegrow.protocol import native as wire
    from voicegrow.protocol.errors import ErrorCode, ProtocolError

from tests.fuzz import JSON_TOKENS, run_target

#: A small limit next to the default one, so that OVERSIZED is reachable with short inputs.
SMALL_MAX_PAYLOAD = 64


def _sample_session() -> list[bytes]:
    from tests.test_protocol_doc import sample_frames

    return [message for _, _, message in sample_frames()]


def _one_of_each_type() -> list[wire.Frame]:
    fmt_in, fmt_out = wire.AudioFormat(16000), wire.AudioFormat(24000, channels=2)
    frames: list[wire.Frame] = [
        wire.Hello("kitchen-01", fmt_in, fmt_out, token="t0k", capabilities={"x": [1, {"y": None}]},
                   client="fw/1", timestamp_ms=5),
        wire.Hello("d", fmt_in, fmt_in),
        wire.HelloAck("s-1", fmt_in, fmt_out, server="voicegrow", capabilities={"max_payload": 262144}),
        wire.Audio(bytes(range(64)), turn_id=3, seq=9, timestamp_ms=100, last=True),
        wire.Audio(b""),
        wire.Ping(2**64 - 1, timestamp_ms=7),
        wire.Pong(0),
        wire.Error(int(ErrorCode.BAD_MAGIC), "bad magic", turn_id=1),
        wire.Error(999, "from a newer peer"),
        wire.Close(1000, "bye"),
        wire.Close(1001),
        wire.Control("abort", {"reason": "button"}, turn_id=4),
        wire.Control("future_event", {"nested": {"a": [1.5, -2, True, "é"]}}),
        wire.Control("turn_timings", {"speech_start": 0, "asr_done": 12.5, "llm_first_token": None}),
    ]
    data = {"asr_partial": {"text": "hi"}, "asr_final": {"text": "hi", "lang": "en"},
            "llm_text": {"text": "ok"}, "tts_start": {"sample_rate": 24000}, "tts_sentence": {"text": "ok"},
            "tts_stop": {"reason": "done"}, "error_spoken": {"reason": "timeout", "text": "sorry"},
            "turn_end": {"outcome": "completed", "error": None}}
    for event in wire.ControlEvent:
        frames.append(wire.Control(event, data.get(event.value, {}), turn_id=1, seq=2))
    return frames


def seeds() -> list[bytes]:
    """The docs' sample session (each frame, and all of them as one stream) and a frame of each type."""
    session = _sample_session()
    encoded = [wire.encode(frame) for frame in _one_of_each_type()]
    return session + encoded + [b"".join(session), b"".join(encoded)]


#: Header bytes, frame types and the JSON keys of the payloads, as tokens for the fuzzer's dictionary.
TOKENS = (*JSON_TOKENS, wire.MAGIC + bytes([wire.VERSION]), *(bytes([t]) for t in wire.FrameType),
          b"\xff\xff\xff\xff", '"device_id"', '"audio_in"', '"audio_out"', '"sample_rate"', '"channels"',
          '"sample_width"', '"codec"', '"token"', '"capabilities"', '"event"', '"data"',
          *(f'"{e.value}"' for e in wire.ControlEvent))


def _split_point(data: bytes) -> int:
    """Where to cut the input in two stream chunks: taken from the data, so the fuzzer steers it."""
    if not data:
        return 0
    return data[len(data) // 2] * (len(data) + 1) // 256


def _check_round_trip(frame: wire.Frame) -> None:
    again = wire.decode_message(wire.encode(frame))
    if again != frame:
        raise AssertionError(f"round trip changed the frame: {frame!r} -> {again!r}")


def _decode_stream(data: bytes, max_payload: int) -> list[wire.Frame]:
    decoder = wire.FrameDecoder(max_payload=max_payload)
    frames: list[wire.Frame] = []
    cut = _split_point(data)
    try:
        for chunk in (data[:cut], data[cut:]):
            decoder.receive_data(chunk)
            frames.extend(decoder)
        decoder.receive_eof()
        frames.extend(decoder)
    except ProtocolError:
        try:  # a failed stream stays failed: the same error again, never a frame
            decoder.next_frame()
        except ProtocolError:
            pass
        else:
            raise AssertionError("the stream decoder went on after a protocol error") from None
    return frames


def fuzz_one_input(data: bytes) -> None:
    for max_payload in (wire.DEFAULT_MAX_PAYLOAD, SMALL_MAX_PAYLOAD):
        try:
            single: wire.Frame | None = wire.decode_message(data, max_payload=max_payload)
        except ProtocolError:
            single = None
        stream = _decode_stream(data, max_payload)
        for frame in stream:
            _check_round_trip(frame)
        if single is not None:
            _check_round_trip(single)
            if stream != [single]:
                raise AssertionError(f"one-frame message: decode_message gave {single!r}, the stream {stream!r}")


if __name__ == "__main__":
    run_target(sys.argv, fuzz_one_input, seeds(), TOKENS)
