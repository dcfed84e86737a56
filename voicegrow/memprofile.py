"""Opt-in allocation tracing: which lines of code hold the memory a long-running server gained.

A leak shows as a slope of the resident set over hours; the slope alone does not say where it comes
from. With ``MEMORY_TRACE_FRAMES`` set, :mod:`tracemalloc` records every Python allocation with that
many frames of its traceback, and the admin API compares the live allocations with a baseline
(taken at start-up, or when asked: after a warm-up, so that caches filling up are not counted):
the sites that grew most, by size and by count. Off by default: tracing slows allocation-heavy code
by about a third and costs memory of its own, which :meth:`MemoryTracer.report` reports apart.

Python allocations only: memory of C libraries (CTranslate2, webrtcvad) and of the allocator itself
(fragmentation) shows as RSS that the traced total does not follow, which is the report's other use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import tempfile
import time
import tracemalloc
from typing import Any

__all__ = ["MemoryTracer", "arena_count", "gc_stats", "glibc", "malloc_stats", "memory_report", "release_memory", "resident_bytes"]

#: Allocations of the tracer and of the import machinery are noise in a growth report.
_IGNORED = (
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
    tracemalloc.Filter(False, "<unknown>"),
)


def resident_bytes() -> int | None:
    """This process's resident set size (Linux ``/proc``), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def glibc() -> Any:
    """glibc, if this process runs on it (``mallinfo2`` needs 2.33); None elsewhere (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "mallinfo2") or not hasattr(libc, "malloc_trim"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def malloc_stats() -> dict[str, int] | None:
    """What glibc's allocator holds, all arenas together (``mallinfo2``); None off glibc.

    ``in_use_bytes`` is what the program (Python and every C library) has allocated; ``free_held_bytes``
    is freed memory the allocator keeps in its arenas instead of returning it (fragmentation, or room
    kept for reuse); ``mmapped_bytes`` are large blocks mapped on their own, returned when freed.
    """
    libc = glibc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return {"arena_bytes": info.arena, "mmapped_bytes": info.hblkhd, "in_use_bytes": info.uordblks,
            "free_held_bytes": info.fordblks, "releasable_top_bytes": info.keepcost, "free_chunks": info.ordblks}


def arena_count() -> int | None:
    """How many arenas glibc has made in this process (``malloc_info``'s ``<heap>`` elements; they are
    never given back, and each keeps what was freed in it); None off glibc or where it cannot say.

    It walks every free chunk of every arena: tens of milliseconds on a big heap, so the memory report
    asks for it only with its full report, not with the cheap one ``bench soak`` samples."""
    libc = glibc()
    if libc is None or not hasattr(libc, "malloc_info"):
        return None
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fopen.restype = ctypes.c_void_p
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    try:
        with tempfile.NamedTemporaryFile(prefix="voicegrow-malloc-", suffix=".xml") as tmp:
            stream = libc.fopen(tmp.name.encode(), b"w")
            if not stream:
                return None
            try:
                failed = libc.malloc_info(0, stream) != 0
            finally:
                libc.fclose(stream)
            return None if failed else tmp.read().count(b"<heap nr=")
    except OSError:
        return None


def gc_stats() -> dict[str, Any]:
    """The cycle collector's figures: collections per generation so far, objects waiting per generation.

    Objects that outlived two collections sit in generation 2, which is collected in full only once
    the objects promoted there since the last full collection reach a quarter of those already there:
    in a process holding a big model that can take hours, so anything of a session that is freed only
    by the cycle collector piles up meanwhile.
    """
    stats = gc.get_stats()
    return {"collections": [s["collections"] for s in stats], "collected": [s["collected"] for s in stats],
            "uncollectable": sum(s["uncollectable"] for s in stats), "pending": list(gc.get_count())}


def release_memory() -> dict[str, Any]:
    """Collect every generation, then return the allocator's free pages (``malloc_trim(0)``).

    RSS and allocator figures before, after the collection and after the trim: a large drop at the
    collection says memory waited in reference cycles; at the trim, that it was held free.
    """
    before, malloc_before = resident_bytes(), malloc_stats()
    collected = gc.collect()
    after_gc, malloc_after_gc = resident_bytes(), malloc_stats()
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)
    return {"gc_collected_objects": collected, "rss_before_bytes": before, "rss_after_gc_bytes": after_gc,
            "rss_after_trim_bytes": resident_bytes() if libc is not None else None,
            "malloc_before": malloc_before, "malloc_after_gc": malloc_after_gc, "malloc_after_trim": malloc_stats()}


class MemoryTracer:
    """tracemalloc started with ``frames`` frames per allocation, and a baseline to compare with."""

    def __init__(self, frames: int) -> None:
        if frames < 1:
            raise ValueError("frames must be at least 1")
        self.frames = frames
        self._started_here = not tracemalloc.is_tracing()
        if self._started_here:
            tracemalloc.start(frames)
        self._baseline: tracemalloc.Snapshot | None = None
        self._baseline_at = 0.0
        self._baseline_rss: int | None = None
        self.reset_baseline()

    def reset_baseline(self) -> dict[str, Any]:
        """Take the allocations alive now as the baseline that growth is measured from."""
        self._baseline = self._snapshot()
        self._baseline_at = time.time()
        self._baseline_rss = resident_bytes()
        return {"baseline_at": self._baseline_at, "traced_bytes": self._traced_total(self._baseline),
                "rss_bytes": self._baseline_rss}

    def report(self, *, limit: int = 20, group_by: str = "lineno") -> dict[str, Any]:
        """The ``limit`` sites whose live allocations grew most since the baseline (by bytes).

        ``group_by``: ``lineno`` (the allocating line) or ``traceback`` (the whole recorded stack,
        which tells apart the callers of a shared helper).
        """
        if group_by not in ("lineno", "traceback"):
            raise ValueError("group_by must be lineno or traceback")
        assert self._baseline is not None
        now = self._snapshot()
        stats = now.compare_to(self._baseline, group_by)
        growing = sorted((s for s in stats if s.size_diff > 0), key=lambda s: s.size_diff, reverse=True)
        current, peak = tracemalloc.get_traced_memory()
        rss = resident_bytes()
        return {
            "frames": self.frames,
            "baseline_at": self._baseline_at,
            "seconds_since_baseline": round(time.time() - self._baseline_at, 1),
            "traced_bytes": self._traced_total(now),
            "traced_growth_bytes": self._traced_total(now) - self._traced_total(self._baseline),
            "traced_peak_bytes": peak,
            "tracer_overhead_bytes": tracemalloc.get_tracemalloc_memory(),
            "rss_bytes": rss,
            "rss_growth_bytes": None if rss is None or self._baseline_rss is None else rss - self._baseline_rss,
            "current_bytes": current,
            "top": [_site(s) for s in growing[:limit]],
        }

    def close(self) -> None:
        """Stop tracing if this object started it (tests start and stop servers in one process)."""
        if self._started_here and tracemalloc.is_tracing():
            tracemalloc.stop()
        self._baseline = None

    @staticmethod
    def _snapshot() -> tracemalloc.Snapshot:
        return tracemalloc.take_snapshot().filter_traces(_IGNORED)

    @staticmethod
    def _traced_total(snapshot: tracemalloc.Snapshot) -> int:
        return sum(trace.size for trace in snapshot.traces)


def _site(stat: tracemalloc.StatisticDiff) -> dict[str, Any]:
    # A Traceback iterates oldest frame first; the allocating line is the last one.
    frames = [f"{frame.filename}:{frame.lineno}" for frame in reversed(list(stat.traceback))]
    return {"site": frames[0] if frames else "?", "traceback": frames, "size_diff_bytes": stat.size_diff,
            "count_diff": stat.count_diff, "size_bytes": stat.size, "count": stat.count}


def memory_report(tracer: MemoryTracer | None, *, limit: int = 20, group_by: str = "lineno") -> dict[str, Any]:
    """RSS and the allocator's figures always; the growth sites when ``tracer`` is running and
    ``limit`` > 0 (a snapshot of a big heap takes a while: ``limit=0`` skips it)."""
    return {"rss_bytes": resident_bytes(), "malloc": malloc_stats(), "gc": gc_stats(),
            "malloc_arenas": arena_count() if limit else None,
            "tracing": tracer.report(limit=limit, group_by=group_by) if tracer is not None and limit else None}
