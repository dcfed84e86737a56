"""``python -m bench room``: a speaker in a living room — noise, a television, listening modes.

Filled in below; this first part is the television (other people's speech for minutes), which the
listening-mode tests use too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SAMPLE_RATE = 16_000


def tv_speech(clips: Sequence[np.ndarray], seconds: float, *, seed: int = 0, gain_db: float = 0.0) -> np.ndarray:
    """``seconds`` of a television talking: the clips (int16, 16 kHz) one after the other in a seeded
    order, 0.15–0.9 s apart as in a dialogue, scaled by ``gain_db``; float32 in int16 units."""
    if not clips:
        raise ValueError("tv_speech needs at least one clip")
    rng = np.random.default_rng(seed)
    total = int(seconds * SAMPLE_RATE)
    out = np.zeros(total, dtype=np.float32)
    position = 0
    while position < total:
        clip = np.asarray(clips[int(rng.integers(len(clips)))], dtype=np.float32)
        take = min(len(clip), total - position)
        out[position: position + take] = clip[:take]
        position += take + int(rng.uniform(0.15, 0.9) * SAMPLE_RATE)
    return out * np.float32(10 ** (gain_db / 20))


def to_pcm(samples: np.ndarray) -> bytes:
    """float samples in int16 units → s16le bytes, clipped."""
    return np.clip(np.round(samples), -32768, 32767).astype("<i2").tobytes()
