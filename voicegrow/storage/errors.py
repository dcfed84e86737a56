"""Storage errors, each with a code an operator (or the admin API) can act on.

The split that matters to the spool writer is *transient* versus *permanent*: a backend that cannot be
reached (:class:`BackendUnavailable`) is retried for as long as it takes, while a record the backend
refuses for what it is (:class:`RecordRejected`) is retried a few times and then set aside, so that one
bad record can never stop every record behind it.
"""

from __future__ import annotations

__all__ = [
    "StorageError", "BackendUnavailable", "RecordRejected", "MigrationError", "SpoolError",
    "SpoolLockedError", "CorruptSpoolRecord", "InvalidCursor", "InvalidKey",
]


class StorageError(Exception):
    """Base class; ``code`` is a stable short identifier (``snake_case``)."""

    code = "storage_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BackendUnavailable(StorageError):
    """The backend could not be reached or did not answer in time; the same call may work later."""

    code = "backend_unavailable"


class RecordRejected(StorageError):
    """The backend answered and refused this record; retrying the same record will not help."""

    code = "record_rejected"


class MigrationError(StorageError):
    """A schema migration could not be read or applied."""

    code = "migration_failed"


class SpoolError(StorageError):
    """The local spool could not be written: records handed to persistence are being lost."""

    code = "spool_write_failed"


class SpoolLockedError(SpoolError):
    """Another process holds the spool directory; two writers would replay each other's records."""

    code = "spool_locked"


class CorruptSpoolRecord(SpoolError):
    """A spool file fails its checksum or cannot be parsed."""

    code = "spool_record_corrupt"


class InvalidCursor(StorageError):
    """A pagination cursor that this server did not hand out (or that was altered)."""

    code = "invalid_cursor"


class InvalidKey(StorageError):
    """An object key that is empty, absolute or climbs out of the store."""

    code = "invalid_key"
