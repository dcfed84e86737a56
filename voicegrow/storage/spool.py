"""A durable, ordered, local queue of records waiting for one backend.

Why a spool: a turn's recording must survive a database or object-store outage, and a crash during it,
without the turn ever waiting on the network. A caller's ``append`` returns once the record is on disk
(:func:`~voicegrow.atomicfile.atomic_write`: a temporary file, fsynced, renamed into place, directory
fsynced), which takes a millisecond or two on a local disk; the backend is written later by a :class:`SpoolWriter`.

Layout: one directory per backend (so an object store outage never holds up database writes), one file
per record named by its sequence number, ``000000000042.rec``. A file is

    b"VGSPOOL1" | u32 header length | u32 CRC-32 of header+payload | header (JSON) | payload

Records leave the spool strictly in order and only after the backend acknowledged them; a crash
between the acknowledgement and the unlink means the record is applied again on replay, which the
backends make harmless (primary keys, upserts, S3 puts of the same key): exactly once in effect.
A record that fails its checksum, or that a backend refuses for good, is moved to ``rejected/`` with
a ``.reason`` file next to it, never silently dropped.

The sequence restarts after the highest file found at open, so numbers are unique only among the
records present; that is all ordering needs. One process per spool directory: :func:`lock_directory`.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import trio

from voicegrow.atomicfile import atomic_write
from voicegrow.storage.errors import CorruptSpoolRecord, SpoolError, SpoolLockedError

__all__ = ["Spool", "lock_directory"]

_MAGIC = b"VGSPOOL1"
_FIXED = struct.Struct(">II")
_SUFFIX = ".rec"


def lock_directory(path: Path) -> BinaryIO:
    """An exclusive lock on ``path`` held as long as the returned file stays open."""
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / ".lock", "ab")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SpoolLockedError(f"spool directory {path} is in use by another process") from None
    return handle


def encode_record(header: dict[str, Any], payload: bytes) -> bytes:
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")
    return _MAGIC + _FIXED.pack(len(head), zlib.crc32(payload, zlib.crc32(head))) + head + payload


def decode_record(data: bytes) -> tuple[dict[str, Any], bytes]:
    fixed_end = len(_MAGIC) + _FIXED.size
    if len(data) < fixed_end or not data.startswith(_MAGIC):
        raise CorruptSpoolRecord("not a spool record (bad magic or truncated)")
    head_len, crc = _FIXED.unpack_from(data, len(_MAGIC))
    head, payload = data[fixed_end:fixed_end + head_len], data[fixed_end + head_len:]
    if len(head) != head_len or zlib.crc32(payload, zlib.crc32(head)) != crc:
        raise CorruptSpoolRecord("checksum mismatch")
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptSpoolRecord(f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptSpoolRecord("header is not an object")
    return header, payload


class Spool:
    """Records for one backend, oldest first. Call :meth:`open` before anything else."""

    def __init__(self, directory: str | Path, *, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self._fsync = fsync
        self._pending: collections.deque[int] = collections.deque()
        self._next_seq = 1
        self._append_lock = trio.Lock()
        self._limiter = trio.CapacityLimiter(1)
        self._changed = trio.Event()
        #: Records set aside in ``rejected/`` (found at open, plus those set aside since).
        self.rejected_count = 0
        #: Called whenever the depth changes (the metrics gauge follows it exactly).
        self.on_change: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._pending)

    def head(self) -> int | None:
        return self._pending[0] if self._pending else None

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}{_SUFFIX}"

    async def open(self) -> None:
        """Create the directory, drop half-written temporaries, and load the records left by a crash."""
        def scan() -> list[int]:
            self.directory.mkdir(parents=True, exist_ok=True)
            for tmp in self.directory.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            return sorted(int(p.stem) for p in self.directory.glob(f"*{_SUFFIX}") if p.stem.isdigit())

        try:
            found = await trio.to_thread.run_sync(scan, limiter=self._limiter)
        except OSError as exc:
            raise SpoolError(f"cannot open spool {self.directory}: {exc}") from exc
        self.rejected_count = len(self.rejected())
        self._pending = collections.deque(found)
        self._next_seq = (found[-1] + 1) if found else 1
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        if self.on_change is not None:
            self.on_change()

    async def append(self, header: dict[str, Any], payload: bytes = b"") -> int:
        """Store one record durably; its sequence number. SpoolError if the disk refuses."""
        data = encode_record(header, payload)
        async with self._append_lock:  # sequence order == file order == replay order
            seq = self._next_seq
            try:
                await trio.to_thread.run_sync(lambda: atomic_write(self._path(seq), data, fsync=self._fsync),
                                              limiter=self._limiter)
            except OSError as exc:
                raise SpoolError(f"cannot write to spool {self.directory}: {exc}") from exc
            self._next_seq = seq + 1
            self._pending.append(seq)
            self._wake()
            return seq

    async def wait_nonempty(self) -> None:
        while not self._pending:
            await self._changed.wait()

    async def wait_empty(self) -> None:
        while self._pending:
            await self._changed.wait()

    async def read(self, seq: int) -> tuple[dict[str, Any], bytes]:
        """The header and payload of a pending record (CorruptSpoolRecord if it does not verify)."""
        try:
            data = await trio.to_thread.run_sync(self._path(seq).read_bytes, limiter=self._limiter)
        except FileNotFoundError:
            raise CorruptSpoolRecord(f"record file {seq} vanished") from None
        except OSError as exc:
            raise SpoolError(f"cannot read spool record {seq} in {self.directory}: {exc}") from exc
        return decode_record(data)

    async def remove(self, seq: int) -> None:
        """Forget a record the backend acknowledged (no fsync: a replay of it would be harmless)."""
        self._pending.remove(seq)
        self._wake()
        try:
            await trio.to_thread.run_sync(self._path(seq).unlink, True, limiter=self._limiter)
        except OSError as exc:
            raise SpoolError(f"cannot remove spool record {seq} in {self.directory}: {exc}") from exc

    async def quarantine(self, seq: int, reason: str) -> Path:
        """Move a record aside into ``rejected/`` with its reason; where it went."""
        target_dir = self.directory / "rejected"
        target = target_dir / self._path(seq).name

        def move() -> None:
            target_dir.mkdir(exist_ok=True)
            try:
                os.replace(self._path(seq), target)
            except FileNotFoundError:  # removed behind our back: only the reason is left to record
                pass
            target.with_suffix(".reason").write_text(reason + "\n", encoding="utf-8")

        self._pending.remove(seq)
        self.rejected_count += 1
        self._wake()
        try:
            await trio.to_thread.run_sync(move, limiter=self._limiter)
        except OSError as exc:
            raise SpoolError(f"cannot set aside spool record {seq} in {self.directory}: {exc}") from exc
        return target

    def rejected(self) -> list[Path]:
        folder = self.directory / "rejected"
        return sorted(folder.glob(f"*{_SUFFIX}")) if folder.is_dir() else []
