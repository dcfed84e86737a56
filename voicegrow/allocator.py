"""glibc's allocator for a long-running server: at most two malloc arenas, unless told otherwise.

glibc gives each thread that allocates while another holds the lock an arena of its own, up to
eight per core, and never returns an arena. The server's allocating threads are short-lived: trio's
worker threads (ASR, storage, files) come and go, CTranslate2 runs its own pool. Each turn's audio
buffers of varying size are freed in whichever arena the thread that allocated them had, and what
is freed there stays mapped as free space no other arena can use. Measured with 40 speakers (docs/
memory.md, issue 25): the memory in use stayed flat while the memory held free in the arenas grew
with every turn, and ``malloc_trim(0)`` gave back 80 MB; with two arenas the held-free memory stops
growing, because the next turn's buffers fit in what the last ones freed.

``MALLOC_ARENA_MAX`` in the environment is glibc's own variable and wins: the limit here is only the
default for a server started without it. It is set with ``mallopt`` at the start of ``voicegrow
serve`` (and of each worker process), before any thread exists, which is equivalent to the variable
(glibc sizes its arena table when the first thread wants an arena). The image sets the variable
itself (Dockerfile), so that ``python -m voicegrow`` or any other entry point gets it too.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

from voicegrow.memprofile import glibc

__all__ = ["DEFAULT_ARENA_MAX", "limit_arenas"]

#: The arenas a server process keeps when ``MALLOC_ARENA_MAX`` is not set (the main one and one more).
DEFAULT_ARENA_MAX = 2
_M_ARENA_MAX = -8  # glibc's malloc.h


def limit_arenas(environ: Mapping[str, str] = os.environ, arena_max: int = DEFAULT_ARENA_MAX) -> int | None:
    """Cap glibc's arenas at ``arena_max`` unless ``MALLOC_ARENA_MAX`` is set; the cap applied, or None
    (the variable is set, so glibc already did what it says; or this is not glibc)."""
    if environ.get("MALLOC_ARENA_MAX", "").strip():
        return None
    libc = glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return arena_max if libc.mallopt(_M_ARENA_MAX, arena_max) == 1 else None
