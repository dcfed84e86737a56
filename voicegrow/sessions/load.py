"""Load-aware admission: a replica that is already behind refuses new speakers at the handshake.

Two signals, each with its own threshold (0: that check is off):

- ``ADMIT_MAX_ASR_WAIT_S``: how long the oldest live utterance has waited for an ASR worker (the
  ASR service's :meth:`queue_wait_s`). A speaker admitted now would wait at least that long for
  every answer; another replica may have a free worker.
- ``ADMIT_MAX_CPU``: this process's CPU over the last few seconds, as a share of the cores it may
  use (its CPU affinity, and the container's CPU quota where cgroup v2 sets one). An event loop that
  is short of CPU delays every speaker's audio, not only the new one's.

The refusal is HTTP 503 with ``Retry-After`` (``ADMIT_RETRY_AFTER_S``): nginx's ``proxy_next_upstream
… http_503`` sends the speaker to the next replica, and a speaker that reached this one directly retries
later. Sessions already admitted are never touched. The thresholds and the current load are gauges
(``voicegrow_admission_threshold``, ``voicegrow_admission_load``, label ``check``: ``asr_wait_s``,
``cpu``), refusals count as ``voicegrow_limit_hits_total{limit="overloaded"}``.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

__all__ = ["LoadMonitor", "usable_cores"]

_SAMPLE_S = 1.0
_WINDOW_S = 5.0


def usable_cores(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float:
    """The cores this process may run on: its affinity, lowered by a cgroup v2 CPU quota if one is set."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        cores = float(os.cpu_count() or 1)
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max" and float(period) > 0:
            cores = min(cores, float(quota) / float(period))
    except (OSError, ValueError):
        pass
    return max(cores, 0.01)


class LoadMonitor:
    """This process's load as admission sees it; :meth:`run` samples the CPU once a second."""

    def __init__(self, settings: Any, asr: Any, metrics: Any, *, cores: float | None = None,
                 cpu_clock: Callable[[], float] = time.process_time,
                 wall_clock: Callable[[], float] = time.monotonic) -> None:
        self.max_asr_wait_s = settings.admit_max_asr_wait_s
        self.max_cpu = settings.admit_max_cpu
        self.retry_after_s = settings.admit_retry_after_s
        self.cores = cores if cores is not None else usable_cores()
        self._asr = asr
        self._metrics = metrics
        self._cpu_clock, self._wall_clock = cpu_clock, wall_clock
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self.cpu = 0.0
        metrics.admission_threshold.labels("asr_wait_s").set(self.max_asr_wait_s)
        metrics.admission_threshold.labels("cpu").set(self.max_cpu)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.sample()
        task_status.started()
        while True:
            await trio.sleep(_SAMPLE_S)
            self.sample()

    def sample(self) -> None:
        """Take one CPU reading; the load is the average over the last ``_WINDOW_S`` of readings."""
        now, used = self._wall_clock(), self._cpu_clock()
        self._samples.append((now, used))
        while len(self._samples) > 2 and now - self._samples[1][0] >= _WINDOW_S:
            self._samples.popleft()
        first_at, first_used = self._samples[0]
        if now > first_at:
            self.cpu = max(0.0, (used - first_used) / (now - first_at) / self.cores)
        self._metrics.admission_load.labels("cpu").set(self.cpu)

    def asr_wait_s(self) -> float:
        wait = float(self._asr.queue_wait_s())
        self._metrics.admission_load.labels("asr_wait_s").set(wait)
        return wait

    def refusal(self) -> str | None:
        """Why a new session should go elsewhere now, or None to admit it."""
        if self.max_asr_wait_s > 0:
            wait = self.asr_wait_s()
            if wait > self.max_asr_wait_s:
                return f"overloaded: utterances wait {wait:.1f} s for speech recognition"
        if self.max_cpu > 0 and self.cpu > self.max_cpu:
            return f"overloaded: CPU at {self.cpu:.0%} of {self.cores:g} cores"
        return None
