"""``voicegrow talk``: speak a WAV file to a running server as a device would, and show the answer.

The quickest check that a deployment works end to end (network, ASR, LLM, TTS) and where its time
goes: it prints what the server heard, the reply, the server's per-stage timings and the latency the
client itself measured. ``--json`` gives the same as one JSON object for scripts.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from typing import Any

import trio

from voicegrow.audio import WavFormatError, read_wav, resample, write_wav
from voicegrow.client import (
    NativeClientError,
    TalkEvent,
    TalkResult,
    open_native_client,
    stream_wav_and_collect,
)
from voicegrow.protocol import ProtocolError
from voicegrow.protocol.native import TIMING_KEYS

__all__ = ["main", "build_parser", "load_clip_16k"]

_STREAM_RATE = 16000
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voicegrow talk",
        description="Stream a WAV file to a VoiceGrow server over the native protocol and print the reply.")
    parser.add_argument("--url", required=True, help="server WebSocket URL, e.g. ws://127.0.0.1:4399/")
    parser.add_argument("--wav", required=True, help="16-bit PCM WAV, any rate, mono or stereo")
    parser.add_argument("--save-reply", metavar="OUT.wav", help="write the reply audio to this WAV file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--speed", type=_positive_float, default=1.0,
                        help="stream N times faster than real time (default 1)")
    parser.add_argument("--timeout", type=_positive_float, default=30.0,
                        help="seconds to wait for the reply after the clip (default 30)")
    parser.add_argument("--device-id", default="voicegrow-talk", help="device id sent in HELLO")
    parser.add_argument("--token", default=None, help="device token, if the server requires one (DEVICE_AUTH=token)")
    parser.add_argument("--secret", default=None, help="device secret for the HMAC challenge (DEVICE_AUTH=hmac)")
    parser.add_argument("--cafile", default=None,
                        help="with wss://: trust this PEM certificate or CA (a self-signed TLS_CERT_FILE)")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def load_clip_16k(path: str) -> bytes:
    """Any 16-bit WAV as 16 kHz mono s16le, the format the client streams."""
    samples, rate = read_wav(path)
    if rate != _STREAM_RATE:
        samples = resample(samples, rate, _STREAM_RATE)
    return samples.astype("<i2", copy=False).tobytes()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        pcm = load_clip_16k(args.wav)
    except (OSError, WavFormatError) as exc:
        return _fail(f"cannot read {args.wav}: {exc}", EXIT_USAGE)
    try:
        args.ssl_context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    except (OSError, ssl.SSLError) as exc:
        return _fail(f"cannot use --cafile {args.cafile}: {exc}", EXIT_USAGE)
    try:
        result = trio.run(_talk, args, pcm)
    except (NativeClientError, ProtocolError) as exc:
        return _fail(str(exc))
    if args.save_reply:
        try:
            write_wav(args.save_reply, result.reply_audio, result.reply_sample_rate)
        except OSError as exc:
            return _fail(f"cannot write {args.save_reply}: {exc}")
    if args.json:
        print(json.dumps(_summary(result), ensure_ascii=False))
    else:
        _print_report(result, args.save_reply)
    if result.failure or result.timed_out:
        return _fail(result.failure or f"no complete reply within {args.timeout:g} s after the clip")
    return EXIT_OK


async def _talk(args: argparse.Namespace, pcm: bytes) -> TalkResult:
    on_event = None if args.json else _print_progress
    async with open_native_client(args.url, device_id=args.device_id, token=args.token,
                                  secret=args.secret, ssl_context=args.ssl_context,
                                  connect_timeout_s=min(10.0, args.timeout)) as client:
        return await stream_wav_and_collect(client, pcm, speed=args.speed, timeout_s=args.timeout,
                                            on_event=on_event)


def _summary(result: TalkResult) -> dict[str, Any]:
    return {
        "transcript": result.transcript,
        "reply": result.reply,
        "timings_ms": result.timings_ms,
        "reply_audio_s": round(result.reply_audio_s, 3),
    }


def _print_progress(event: TalkEvent) -> None:
    if event.event == "asr_final" and event.data["text"].strip():
        print(f"heard:  {event.data['text']}" + (f"  [{event.data['lang']}]" if event.data["lang"] else ""),
              flush=True)


def _print_report(result: TalkResult, saved_to: str | None) -> None:
    if not result.transcript:
        print("heard:  (nothing)")
    print(f"reply:  {result.reply or '(none)'}")
    timings = [(key, result.timings_ms[key]) for key in TIMING_KEYS if key in result.timings_ms]
    timings += [(key, value) for key, value in result.timings_ms.items() if key not in TIMING_KEYS]
    if timings:
        print("server (ms from speech start): " + ", ".join(
            f"{key} {'-' if value is None else f'{value:.0f}'}" for key, value in timings))
    first = result.client_first_audio_s
    print(f"client: first reply audio {'never' if first is None else f'{first:.3f} s'} after the clip ended; "
          f"{result.reply_audio_s:.2f} s of reply audio at {result.reply_sample_rate} Hz")
    if saved_to:
        print(f"saved:  {saved_to}")


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"voicegrow talk: {message}", file=sys.stderr)
    return code
