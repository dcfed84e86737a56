"""What Opus costs a xiaozhi session: encode and decode milliseconds per second of audio, side by side.

A session decodes the board's 16 kHz packets while the user talks and encodes 60 ms packets at the
downstream rate (24 kHz by default) while the reply plays. This measures both on real speech (a
fixture clip) through :mod:`voicegrow.opus` (PyAV's bundled libopus) and, when ``opuslib`` is
importable (ctypes over Debian's ``libopus0``; not a project dependency), through it too, the
candidates interleaved in each repeat so that a busy machine slows them alike.

    python -m bench.opus_cost --wav ../shared/fixtures/audio/zh-00.wav --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from voicegrow.audio import read_wav, resample
from voicegrow.opus import OpusDecoder, OpusEncoder

__all__ = ["main", "measure"]

FRAME_MS = 60


def _frames(pcm: np.ndarray, rate: int) -> list[bytes]:
    n = rate * FRAME_MS // 1000
    return [pcm[i:i + n].astype("<i2").tobytes() for i in range(0, len(pcm) - n + 1, n)]


def _pyav(up_rate: int, down_rate: int, complexity: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    encoder = OpusEncoder(down_rate, frame_ms=FRAME_MS, complexity=complexity)
    decoder = OpusDecoder(up_rate)
    return encoder.encode, decoder.decode


def _opuslib(up_rate: int, down_rate: int, complexity: int) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    import opuslib  # type: ignore[import-not-found]

    encoder = opuslib.Encoder(down_rate, 1, opuslib.APPLICATION_VOIP)
    encoder.bitrate = 32000
    encoder.complexity = complexity
    decoder = opuslib.Decoder(up_rate, 1)
    down_n, up_n = down_rate * FRAME_MS // 1000, up_rate * FRAME_MS // 1000
    return (lambda pcm: encoder.encode(pcm, down_n)), (lambda packet: decoder.decode(packet, up_n))


def measure(pcm16k: np.ndarray, *, repeat: int = 3, down_rate: int = 24000) -> dict[str, Any]:
    """Per candidate: median ms of CPU per second of audio for decode (16 kHz up) and encode (down)."""
    up_frames = _frames(pcm16k, 16000)
    down_frames = _frames(resample(pcm16k, 16000, down_rate), down_rate)
    seconds = len(up_frames) * FRAME_MS / 1000
    up_packets = [OpusEncoder(16000, frame_ms=FRAME_MS).encode(f) for f in up_frames]
    candidates: dict[str, Callable[..., Any]] = {"pyav complexity 5": lambda: _pyav(16000, down_rate, 5),
                                                 "pyav complexity 10": lambda: _pyav(16000, down_rate, 10)}
    try:
        import opuslib  # type: ignore[import-not-found]  # noqa: F401

        candidates["opuslib complexity 5"] = lambda: _opuslib(16000, down_rate, 5)
        candidates["opuslib complexity 10"] = lambda: _opuslib(16000, down_rate, 10)
    except (ImportError, OSError):
        pass
    samples: dict[str, dict[str, list[float]]] = {name: {"decode": [], "encode": []} for name in candidates}
    for _ in range(repeat):
        for name, make in candidates.items():
            encode, decode = make()
            start = time.process_time()
            for packet in up_packets:
                decode(packet)
            middle = time.process_time()
            for frame in down_frames:
                encode(frame)
            end = time.process_time()
            samples[name]["decode"].append((middle - start) * 1000 / seconds)
            samples[name]["encode"].append((end - middle) * 1000 / seconds)
    return {"audio_s": round(seconds, 2), "repeat": repeat, "down_rate": down_rate,
            "ms_cpu_per_audio_s": {name: {kind: round(statistics.median(v), 2) for kind, v in kinds.items()}
                                   for name, kinds in samples.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.opus_cost", description=__doc__.split("\n")[0])
    parser.add_argument("--wav", required=True, help="speech to code (resampled to 16 kHz mono)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--down-rate", type=int, default=24000, choices=(16000, 24000, 48000))
    args = parser.parse_args(argv)
    samples, rate = read_wav(args.wav)
    pcm = resample(samples, rate, 16000) if rate != 16000 else samples
    print(json.dumps(measure(np.asarray(pcm), repeat=args.repeat, down_rate=args.down_rate), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
