"""Frame-ingest lag: how late the server processes an audio frame after the device sent it.

Device and server clocks share no origin, so the lag is measured against the best case seen so far:
for each frame, ``offset = processed_at - sent_at`` (``sent_at`` on the device's clock: the frame's
timestamp, or for devices that send none, the audio position of a real-time stream); the lag is that
offset minus the smallest offset of the session. A server keeping up reports lags near zero; one falling
behind reports how far, which is what matters for barge-in and end-of-speech detection.
"""

from __future__ import annotations

import math

__all__ = ["IngestLagMeter"]


class IngestLagMeter:
    def __init__(self) -> None:
        self._best_offset = math.inf

    def observe(self, processed_at_s: float, sent_at_s: float) -> float:
        """Record one frame; returns its lag in seconds (0 for the best frame so far)."""
        offset = processed_at_s - sent_at_s
        if offset < self._best_offset:
            self._best_offset = offset
        return offset - self._best_offset
