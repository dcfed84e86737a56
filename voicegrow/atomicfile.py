"""Replacing a file so that a reader, or the file system after a crash, sees the old or the new content.

One helper for the two callers with different needs: the spool and the local blob store write private
records (``0600``, the ``mkstemp`` default) and the spool may turn the fsyncs off for tests and
benches; the ASR model cache writes files other service users must read (``mode=0o644``) and always
syncs. It lives outside ``storage/`` because the pipeline stages may not import storage.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable.

    A file system that cannot sync a directory (``EINVAL``/``EBADF``) has nothing more to offer, so
    that is not an error; any other failure is."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, fsync: bool = True, mode: int | None = None) -> None:
    """``path`` holds either its old content or all of ``data``, also after a crash (blocking).

    The temporary file is ``.<name>.<random>.tmp`` beside the target (the spool sweeps leftovers of
    those away at open); it is removed if anything fails. ``mode`` None keeps ``mkstemp``'s ``0600``.
    ``fsync`` False skips both syncs: atomic for readers, not durable across a power cut."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)
