"""Opus packets to PCM and back, per stream, through PyAV's bundled libopus (sans-IO, no trio).

Why PyAV: its wheel bundles libopus (1.5), it is maintained, and it is already installed as a
faster-whisper dependency — so no Debian ``libopus0`` and no ctypes binding (``opuslib`` has had no
release since 2018). FFmpeg's Opus decoders always produce 48 kHz, so decoded audio goes through
swresample to the rate the session wants. The cost per session is measured by ``python -m
bench.opus_cost`` (docs/xiaozhi.md has the figures).

Each object holds one codec context: a stream's packets depend on the ones before, so a session
keeps its own decoder and encoder and never shares them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["OpusDecoder", "OpusEncoder", "OpusError", "SUPPORTED_RATES"]

#: Rates libopus encodes at (RFC 6716 §2: 8/12/16/24/48 kHz).
SUPPORTED_RATES = (8000, 12000, 16000, 24000, 48000)
_FRAME_MS = (10, 20, 40, 60)


class OpusError(Exception):
    """A packet libopus cannot decode (or a PCM frame it cannot encode); the session drops it."""


class OpusDecoder:
    """Opus packets (one per call) → PCM s16le mono at ``sample_rate``."""

    def __init__(self, sample_rate: int = 16000) -> None:
        import av

        self.sample_rate = sample_rate
        self._av = av
        self._codec = av.CodecContext.create("libopus", "r")
        self._codec.sample_rate = 48000
        self._codec.layout = "mono"
        self._codec.open()
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        self.packets = 0
        self.errors = 0

    def decode(self, packet: bytes) -> bytes:
        """The PCM of one packet; raises :class:`OpusError` for a packet libopus refuses."""
        if not packet:
            raise OpusError("an empty Opus packet")
        try:
            frames = self._codec.decode(self._av.Packet(packet))
            out = [resampled.to_ndarray().tobytes() for frame in frames for resampled in self._resampler.resample(frame)]
        except (self._av.FFmpegError, ValueError) as exc:
            self.errors += 1
            raise OpusError(f"libopus refused the packet: {exc}") from None
        self.packets += 1
        return b"".join(out)


class OpusEncoder:
    """PCM s16le mono at ``sample_rate`` → one Opus packet per ``frame_ms`` frame.

    :meth:`encode` takes exactly one frame (a shorter last frame is padded with silence): the device
    decodes each binary message as one packet of the frame duration the server's hello announced.
    """

    def __init__(self, sample_rate: int = 24000, *, frame_ms: int = 60, bitrate: int = 32000,
                 complexity: int = 5) -> None:
        import av

        if sample_rate not in SUPPORTED_RATES:
            raise OpusError(f"Opus cannot encode at {sample_rate} Hz; expected one of {SUPPORTED_RATES}")
        if frame_ms not in _FRAME_MS:
            raise OpusError(f"Opus frames of {frame_ms} ms are not supported; expected one of {_FRAME_MS}")
        self.sample_rate = sample_rate
        self.frame_ms = frame_ms
        self.frame_samples = sample_rate * frame_ms // 1000
        self._av = av
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.sample_rate = sample_rate
        self._codec.layout = "mono"
        self._codec.format = "s16"
        self._codec.bit_rate = bitrate
        # voip: speech; complexity 5 halves the encoder's cost against the default 10 (measured).
        self._codec.options = {"frame_duration": str(frame_ms), "application": "voip",
                               "compression_level": str(complexity)}
        self._codec.open()
        self._pts = 0

    def encode(self, pcm: bytes) -> bytes:
        """One packet for up to one frame of PCM."""
        samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")
        if len(samples) > self.frame_samples:
            raise OpusError(f"{len(samples)} samples is more than one {self.frame_ms} ms frame")
        if len(samples) < self.frame_samples:
            samples = np.concatenate([samples, np.zeros(self.frame_samples - len(samples), dtype="<i2")])
        frame = self._av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += self.frame_samples
        packets = [bytes(p) for p in self._codec.encode(frame)]
        if len(packets) != 1:
            raise OpusError(f"the encoder returned {len(packets)} packets for one frame")
        return packets[0]
