"""Persistence: MySQL or SQLite for records, Redis or a dict for live state, S3 or a directory for
audio, with a durable local spool in front of the backends. The server uses :class:`Persistence`."""

from voicegrow.storage.errors import (
    BackendUnavailable, InvalidCursor, InvalidKey, MigrationError, RecordRejected, SpoolError, StorageError,
)
from voicegrow.storage.persistence import COMPONENTS, Persistence
from voicegrow.storage.records import TURN_OUTCOMES, Page, SessionRecord, TurnRecord

__all__ = [
    "Persistence", "COMPONENTS", "SessionRecord", "TurnRecord", "Page", "TURN_OUTCOMES", "StorageError",
    "BackendUnavailable", "RecordRejected", "MigrationError", "SpoolError", "InvalidCursor", "InvalidKey",
]
